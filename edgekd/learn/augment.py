"""Label-preserving input augmentation, applied per mini-batch in `kd_train`.

For a 1-D signal (mnist1d, ``[B, C, L]``) or an image (``[B, C, H, W]``), each sample
independently gets, in this order:

* ``shift:<s>``: a circular shift by an integer drawn uniformly from ``[-s, s]`` along
  every spatial axis (mnist1d's own generator translates its templates the same way;
  for images it is the "random crop with padding" of Krizhevsky et al. 2012, without
  the padding);
* ``scale:<a>``: a gain drawn uniformly from ``[1 - a, 1 + a]``;
* ``noise:<σ>``: additive Gaussian noise of standard deviation ``σ``.

Random draws come from a generator of their own, so a run without augmentation draws
exactly the numbers it drew before the option existed. With a torch teacher at hand,
`kd_train` scores the augmented batch with it (the soft targets follow the input);
otherwise the clean sample's soft targets are kept, which is right for a
label-preserving transform and an approximation for the dark knowledge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from edgekd.core.config import parse_augment

__all__ = ["Augment"]


@dataclass(frozen=True)
class Augment:
    """One augmentation recipe (``train.augment``); all zero is the identity."""

    shift: int = 0
    noise: float = 0.0
    scale: float = 0.0

    @classmethod
    def from_spec(cls, spec: str) -> Augment | None:
        """The recipe of ``spec`` (`edgekd.core.config.parse_augment`), None when off."""
        items = parse_augment(spec)
        if not items:
            return None
        return cls(
            shift=int(items.get("shift", 0)),
            noise=float(items.get("noise", 0.0)),
            scale=float(items.get("scale", 0.0)),
        )

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """An augmented copy of the batch ``x`` (``[B, C, *spatial]``); ``x`` is kept."""
        out = x
        if self.shift > 0:
            out = _circular_shift(out, self.shift, gen)
        if self.scale > 0:
            gain = 1.0 + self.scale * (2.0 * torch.rand(len(x), generator=gen) - 1.0)
            out = out * gain.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        if self.noise > 0:
            out = out + self.noise * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        return out


def _circular_shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Roll each sample by its own offset in ``[-max_shift, max_shift]`` on every
    spatial axis (one gather per axis)."""
    out = x
    for axis in range(2, x.dim()):
        n = x.shape[axis]
        offsets = torch.randint(-max_shift, max_shift + 1, (len(x),), generator=gen)
        index = (torch.arange(n).view(1, n) - offsets.view(-1, 1)) % n  # [B, n]
        shape = [len(x)] + [1] * (x.dim() - 1)
        shape[axis] = n
        index = index.view(shape).expand(out.shape)
        out = torch.gather(out, axis, index)
    return out
