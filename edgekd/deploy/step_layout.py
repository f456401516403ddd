"""The interface of the whole-student step graph, torch-free (a device reads it).

`edgekd.deploy.train_step` exports the graph (torch); a bundle ships its
:class:`StepLayout` as JSON beside it, and `edgekd.deploy.step_runtime` feeds the graph
from it on a device without torch. This module imports the standard library and
`edgekd.core.errors` only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from edgekd.core.errors import EdgeKDError

__all__ = ["GROUPS", "OPTIMIZERS", "STEP_SCALARS", "StepLayout", "StepLayoutError"]

#: The optimizers the step graph implements (names as in ``train.optimizer``).
OPTIMIZERS = ("adam", "sgd")
#: Scalar inputs after ``x, labels, teacher_logits, class_weights``, in order.
STEP_SCALARS = ("temperature", "alpha", "lr", "clip_norm", "step", "trust_correct", "weight_ce")
#: The per-tensor input groups, in order, each one tensor per trainable name.
GROUPS = ("params", "masks", "state1", "state2")


class StepLayoutError(EdgeKDError, ValueError):
    """A step layout file is missing fields or holds impossible values."""


@dataclass(frozen=True)
class StepLayout:
    """What a runtime needs to feed the step graph.

    The graph's inputs are ``x, labels, teacher_logits, class_weights``, the scalars
    :data:`STEP_SCALARS`, then the :data:`GROUPS`, each one tensor per name in
    ``names`` (shapes ``shapes``): ``params``, ``masks`` (1 kept, 0 pruned) and the
    optimizer state ``state1``, ``state2`` (Adam's first and second moments; SGD's
    velocity and an unused tensor). Its outputs are the new ``params``, ``state1``,
    ``state2`` and the loss at the weights before the step. The inference graph takes
    ``x`` and ``params`` and returns the logits.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    optimizer: str
    input_shape: tuple[int, ...]
    num_classes: int

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes) or not self.names:
            raise StepLayoutError("a step layout needs one shape per trainable tensor")
        if self.optimizer not in OPTIMIZERS:
            raise StepLayoutError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.num_classes < 2 or not self.input_shape:
            raise StepLayoutError("a step layout needs an input shape and >= 2 classes")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> StepLayout:
        try:
            raw = json.loads(text)
            return cls(
                names=tuple(str(n) for n in raw["names"]),
                shapes=tuple(tuple(int(d) for d in s) for s in raw["shapes"]),
                optimizer=str(raw["optimizer"]),
                input_shape=tuple(int(d) for d in raw["input_shape"]),
                num_classes=int(raw["num_classes"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StepLayoutError(f"unreadable step layout: {exc}") from None

    def input_names(self) -> list[str]:
        fixed = ["x", "labels", "teacher_logits", "class_weights", *STEP_SCALARS]
        return fixed + [f"{group}:{name}" for group in GROUPS for name in self.names]

    def output_names(self) -> list[str]:
        per_tensor = [f"new_{g}:{n}" for g in ("params", "state1", "state2") for n in self.names]
        return [*per_tensor, "loss"]

    def infer_input_names(self) -> list[str]:
        return ["x", *(f"params:{name}" for name in self.names)]
