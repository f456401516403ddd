"""The streams of one continual run, rebuilt from its config alone (numpy; no torch, no flwr).

A federated continual run needs the same data on both sides without shipping any of it:

* :func:`client_stream` is the stream the *devices* learn from. The server builds it too, but
  only scores the student on its test sets; each node cuts its own share of a task's training
  set with `edgekd.continual.streams.task_client_split`.
* :func:`server_stream` is a second, disjoint draw of the same scenario (another seed) that
  the server holds: it trains the teacher on *every* task, which is what lets the teacher
  remember old classes and domains for the student, and it is the public proxy set.

``continual.samples-per-task`` samples are generated per task in both: a class-incremental
stream draws ``tasks x samples-per-task`` mnist1d samples and splits them by class; a
domain-incremental stream draws ``samples-per-task`` per domain. Both are pure functions of
``(scenario, tasks, samples-per-task, seed)`` and cached per process, since a Ray actor
asks for the stream every round.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from edgekd.continual.streams import TaskStream, make_stream
from edgekd.core.config import EdgeKDConfig

__all__ = ["client_stream", "proxy_digest", "server_stream"]

# Salt of the server's draw, so its samples never coincide with the clients'.
_SERVER_SALT = 23


def client_stream(cfg: EdgeKDConfig) -> TaskStream:
    """The tasks the devices learn, in order (requires ``continual.scenario``)."""
    return _stream(
        cfg.continual.scenario, cfg.continual.tasks, cfg.continual.samples_per_task, cfg.seed
    )


def server_stream(cfg: EdgeKDConfig) -> TaskStream:
    """The server's own draw of every task: teacher training data and the proxy set."""
    seed = int(np.random.SeedSequence([cfg.seed, _SERVER_SALT]).generate_state(1)[0])
    return _stream(
        cfg.continual.scenario, cfg.continual.tasks, cfg.continual.samples_per_task, seed
    )


@functools.lru_cache(maxsize=4)
def _stream(scenario: str, tasks: int, samples_per_task: int, seed: int) -> TaskStream:
    if not scenario:
        raise ValueError("continual.scenario is not set: this is not a continual run")
    per_call = samples_per_task * tasks if scenario == "class-incremental" else samples_per_task
    return make_stream(scenario, num_tasks=tasks, seed=seed, num_samples=per_call)


def proxy_digest(x: np.ndarray, probs: np.ndarray) -> str:
    """A short content hash of a proxy set, so a node can cache it between rounds."""
    digest = hashlib.sha256()
    for array in (x, probs):
        a = np.ascontiguousarray(array)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()[:16]
