"""What the phases of a run hand each other (`edgekd.server.pipeline`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from edgekd.learn.compression import Pruner

Say = Callable[[str], None]


@dataclass(frozen=True)
class TeacherPhase:
    """What the teacher phase hands on: the model, what nodes get of it (its ONNX), its
    hash (a resumed run must distil from the very same), and its soft targets."""

    model: nn.Module
    onnx: bytes
    sha256: str
    test_probs: np.ndarray  # on the devices' test split (agreement of every student)
    server_probs: np.ndarray  # on the server-domain test split
    public_probs: np.ndarray  # on the public split at kd.temperature (warm start, FedDF)


@dataclass(frozen=True)
class StudentStart:
    """The student entering round 1: warm-started, maybe pruned and reshaped."""

    init: nn.Module  # the seeded random student (server-only KD starts from it)
    random_init: nn.Module  # an untouched copy of it, for FedAvg without a teacher
    warm: nn.Module
    structure: dict[str, Any]  # filter ratio, factorized layers (report and checkpoint)
    pruner: Pruner | None
