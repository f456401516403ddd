"""Student fidelity report: calibration, uncertainty, robustness and rank order vs the teacher.

`run_inspect` loads a teacher checkpoint and a student (torch checkpoint, ONNX or
TFLite file), scores both on the devices' test split and writes ``fidelity.json``,
``fidelity.md`` and PNG plots. The numbers come from the numpy-only
`edgekd.fidelity.scores` and `edgekd.core.metrics`; torch (for the teacher and for a
torch student's attacks and certificates) is imported only when a function needs it, so
importing this package stays cheap.

Definitions the report relies on, beyond those modules' docstrings:

* the bootstrap uses the run's seed for both models, so teacher and student are scored on
  the same resamples (a paired bootstrap);
* input-space attack radii are fractions of the test inputs' standard deviation
  (`ATTACK_EPS_FRACTIONS`), because mnist1d signals have no fixed range like [0, 1];
* feature-space certificates use one absolute epsilon grid for both models, from 0 to the
  95th percentile of the larger model's certified radii; teacher and student features
  differ in dimension and scale, so compare the curves' shapes, not a single epsilon;
* minority/majority classes are split at the median class count of the device pool,
  the data the federated student was distilled on;
* with ``calibrate`` the temperature is fitted on the server's held-out test split
  (``server_test``: server-held, never trained on; the public split is the teacher's
  training data, where it is overconfident by construction), which is the server
  domain; the test split is the (shifted) device domain, so the calibrated scores show how
  well a server-side calibration carries over to the devices.

The package: `edgekd.inspection.load` reads the models, `edgekd.inspection.analysis`
measures them, `edgekd.inspection.render` writes the JSON, Markdown and plots, and
`edgekd.inspection.run` puts the steps together.
"""

from __future__ import annotations

from edgekd.inspection.analysis import (
    ATTACK_EPS_FRACTIONS,
    BOOTSTRAP_LEVEL,
    CERTIFICATE_POINTS,
    NOT_AVAILABLE,
    RANK_KS,
)
from edgekd.inspection.load import LoadedModel, ModelFileError, load_model
from edgekd.inspection.render import render_markdown, summarize
from edgekd.inspection.run import run_inspect

__all__ = [
    "ATTACK_EPS_FRACTIONS",
    "BOOTSTRAP_LEVEL",
    "CERTIFICATE_POINTS",
    "NOT_AVAILABLE",
    "RANK_KS",
    "LoadedModel",
    "ModelFileError",
    "load_model",
    "render_markdown",
    "run_inspect",
    "summarize",
]
