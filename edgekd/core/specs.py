"""Model specifications: what a checkpoint needs to be rebuilt (torch-free, so a device
running onnxruntime or LiteRT can describe its student without importing torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model; stored in every checkpoint."""

    family: str  # "cnn1d" | "cnn2d"
    in_channels: int
    input_size: int  # sequence length (1-D) or image side (2-D)
    num_classes: int
    width: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def spec_for(input_shape: tuple[int, ...], num_classes: int, width: int) -> ModelSpec:
    """Pick the family from the input shape: (C, L) → cnn1d, (C, H, W) → cnn2d."""
    if len(input_shape) == 2:
        return ModelSpec("cnn1d", input_shape[0], input_shape[1], num_classes, width)
    if len(input_shape) == 3:
        return ModelSpec("cnn2d", input_shape[0], input_shape[2], num_classes, width)
    raise ValueError(f"no model family for input shape {input_shape}")
