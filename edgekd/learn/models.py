"""Teacher and student model families (plain torch).

One CNN per input kind, scaled by a width multiplier: the teacher and the student
are the same family at different widths, so hint distillation and the deploy
split (frozen ``features`` + linear ``head``) work for both. Every model exposes:

* ``features``: a module whose output is the named hint layer (read it with a
  forward hook, torchdistill style: ``capture_features(model, "features")``);
* ``head``: the linear classifier on the flattened features.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from edgekd.core.errors import EdgeKDError, one_line_error
from edgekd.core.specs import ModelSpec, spec_for

__all__ = ["ModelSpec", "spec_for", "build_model", "count_params", "capture_features"]

FEATURE_LAYER = "features"


class CNN1d(nn.Module):
    """Three strided 1-D convolutions and a linear head: the mnist1d paper's CNN
    shape (Greydanus & Kobak 2024) with a width multiplier."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        w = spec.width
        self.features = nn.Sequential(
            nn.Conv1d(spec.in_channels, w, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(w, w, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(w, w, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        length = (spec.input_size + 3) // 4  # two stride-2 convolutions
        self.head = nn.Linear(w * length, spec.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class CNN2d(nn.Module):
    """Two conv-pool blocks, a third conv, global average pooling and a linear head."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        w = spec.width
        self.features = nn.Sequential(
            nn.Conv2d(spec.in_channels, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2) if spec.input_size >= 16 else nn.Identity(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(2 * w, spec.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def build_model(spec: ModelSpec) -> nn.Module:
    if spec.family == "cnn1d":
        return CNN1d(spec)
    if spec.family == "cnn2d":
        return CNN2d(spec)
    raise ValueError(f"unknown model family '{spec.family}'")


def model_state(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """``state_dict`` as numpy copies, in order: what travels, is hashed and is saved."""
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in model.state_dict().items())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextmanager
def capture_features(model: nn.Module, layer: str = FEATURE_LAYER) -> Iterator[dict[str, Tensor]]:
    """Record the output of ``layer`` (a dotted module path) on every forward pass."""
    store: dict[str, Tensor] = {}
    module = model.get_submodule(layer)

    def hook(_m: nn.Module, _inp: Any, out: Tensor) -> None:
        store[layer] = out

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


# ------------------------------------------------------------------ checkpoints
class CheckpointError(EdgeKDError, ValueError):
    """A checkpoint is unreadable or does not match the expected architecture."""


def save_checkpoint(model: nn.Module, spec: ModelSpec, path: str, **extra: Any) -> None:
    torch.save({"spec": spec.to_dict(), "state_dict": model.state_dict(), **extra}, path)


def load_checkpoint(path: str, expected: ModelSpec | None = None) -> tuple[nn.Module, ModelSpec]:
    """Load a model saved by `save_checkpoint`; refuse another architecture by name."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        spec = ModelSpec(**blob["spec"])
        state = blob["state_dict"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"cannot read checkpoint {path}: {one_line_error(exc)}") from None
    if expected is not None:
        diffs = [
            f"{k}={getattr(spec, k)!r} (expected {getattr(expected, k)!r})"
            for k in ("family", "in_channels", "input_size", "num_classes")
            if getattr(spec, k) != getattr(expected, k)
        ]
        if diffs:
            raise CheckpointError(f"checkpoint {path} has another architecture: {', '.join(diffs)}")
    try:
        # Filter-pruned and factorized students: the shapes in the state say how.
        model = model_for_state(spec, state)
        model.load_state_dict(state)
    except (RuntimeError, KeyError, IndexError) as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"checkpoint {path} does not fit {spec.family}: {first}") from None
    return model, spec


def model_for_state(spec: ModelSpec, state: Mapping[str, Any]) -> nn.Module:
    """The spec's model, its layers reshaped to match ``state``: convolutions and
    linears with fewer channels (filter pruning) and layers split in two
    (``name.0``/``name.1``, low-rank). Layer hyper-parameters (kernel, stride,
    padding) come from the spec's model; channel counts and ranks from the shapes."""
    model = build_model(spec)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
            continue
        if f"{name}.0.weight" in state:
            first, second = np.shape(state[f"{name}.0.weight"]), np.shape(state[f"{name}.1.weight"])
            bias = f"{name}.1.bias" in state
            if isinstance(module, nn.Linear):
                new: nn.Module = nn.Sequential(
                    nn.Linear(first[1], first[0], bias=False),
                    nn.Linear(second[1], second[0], bias=bias),
                )
            else:
                cls = type(module)
                new = nn.Sequential(
                    _conv_like(module, first[1], first[0], bias=False),
                    cls(second[1], second[0], 1, bias=bias),
                )
            model.set_submodule(name, new)
        elif f"{name}.weight" in state:
            shape = tuple(np.shape(state[f"{name}.weight"]))
            if shape == tuple(module.weight.shape):
                continue
            if isinstance(module, nn.Linear):
                new = nn.Linear(shape[1], shape[0], bias=module.bias is not None)
            else:
                new = _conv_like(module, shape[1], shape[0], bias=module.bias is not None)
            model.set_submodule(name, new)
    return model


def _conv_like(conv: nn.Module, in_ch: int, out_ch: int, *, bias: bool) -> nn.Module:
    assert isinstance(conv, nn.Conv1d | nn.Conv2d)
    return type(conv)(
        in_ch,
        out_ch,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        bias=bias,
    )


def load_for_state(spec: ModelSpec, state: Mapping[str, np.ndarray]) -> nn.Module:
    """`model_for_state` with ``state`` loaded."""
    model = model_for_state(spec, state)
    model.load_state_dict(OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state.items()))
    return model
