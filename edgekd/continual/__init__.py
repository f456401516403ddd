"""Continual learning for edgekd: task streams, teacher-guided anti-forgetting, CL metrics.

A student on a device meets new classes (class-incremental) or drifting inputs
(domain-incremental) over time; the server's teacher, which knows every class and domain,
supplies soft targets that keep it from forgetting the old ones. The pieces, none of which
imports flwr:

* `edgekd.continual.streams` (numpy): :class:`Task`, :class:`TaskStream`, the mnist1d
  scenarios and each client's share of a task;
* `edgekd.continual.regularizers` (torch): naive fine-tuning, teacher KD, LwF, EWC and
  replay behind one protocol, with numpy-only state for Flower's ``context.state``;
* `edgekd.continual.learner` (torch): one task's local training, stream evaluation and a
  sequential (non-federated) runner;
* `edgekd.continual.metrics` (numpy): average accuracy, forgetting, BWT and FWT;
* `edgekd.continual.scenario` (numpy): the clients' stream and the server's separate draw
  of every task, built from the run's config;
* `edgekd.reporting.continual_plots` (matplotlib): the accuracy-matrix heatmap and per-task curves.

The Flower side is `edgekd.server.continual` (strategy, per-round scoring, report) and
`edgekd.client.continual_client` (the node's handler and its ``context.state``).

Only the numpy parts are re-exported here, so ``import edgekd.continual`` works on a device
without torch; import the torch parts from their modules.
"""

from edgekd.continual.metrics import average_accuracy, bwt, forgetting, fwt, summarize
from edgekd.continual.streams import (
    SCENARIOS,
    Task,
    TaskStream,
    class_incremental_stream,
    domain_incremental_stream,
    make_stream,
    task_client_split,
)

__all__ = [
    "SCENARIOS",
    "Task",
    "TaskStream",
    "average_accuracy",
    "bwt",
    "class_incremental_stream",
    "domain_incremental_stream",
    "forgetting",
    "fwt",
    "make_stream",
    "summarize",
    "task_client_split",
]
