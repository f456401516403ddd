"""Pruning: unstructured masks on a gradual schedule, and structured filter pruning.

Unstructured pruning zeroes single weights and keeps the tensors' shapes (the masks
travel as packed bits, see `edgekd.wire.codec`); structured pruning removes whole conv
filters, so the student really gets smaller and faster on the device.

* Gradual schedule (Zhu & Gupta 2017, "To prune, or not to prune", eq. 1): between
  rounds ``t0`` and ``t0 + n`` the target sparsity follows

      s_t = s_f + (s_i − s_f) · (1 − (t − t0) / n)³

  which prunes fast while many redundant weights remain and slowly near the end; it is
  ``s_i`` before ``t0`` and ``s_f`` after ``t0 + n``.
* Magnitude pruning (Han et al. 2015): keep the weights with the largest ``|W|``.
* "Movement" pruning as the seed defines it: score ``|W − W0|`` against the weights
  ``W0`` at the start of pruning, and prune the weights that moved least. This is not
  the first-order score ``−W·∂L/∂W`` of Sanh et al. 2020 ("Movement Pruning"); it is the
  zeroth-order distance their paper compares against, and needs no gradients, which a
  federated server does not have.
* Where the sparsity goes: ``scope="global"`` ranks raw scores across layers, which on
  a small CNN strips the wide, small-valued head first (90 % global magnitude left 4 %
  of the head and cost 50 accuracy points); ``"layer"`` prunes every tensor by the
  same fraction, starving the 80-weight first conv; ``"lamp"`` (Lee et al. 2021,
  "Layer-adaptive Sparsity for the Magnitude-based Pruning") ranks globally by
  ``score(u) = s_u² / Σ_{v: s_v ≥ s_u} s_v²`` within each layer, which keeps every
  layer's largest entry (score 1) and lets the ranking choose per-layer sparsities.
* Filter pruning (Li et al. 2017, "Pruning Filters for Efficient ConvNets"): drop the
  conv output channels with the smallest L1 norm ``Σ|W_j|`` of their filter and the
  matching input channels of whatever consumes them.

Masks are boolean tensors, ``True`` = keep, keyed like the model's ``state_dict``
(``"features.0.weight"``), so one mask dict serves a module, a state dict and the codec.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)

Scope = Literal["global", "layer", "lamp"]

# Modules in ``features`` that pass channels through unchanged: filter pruning may
# remove a channel across them without touching them.
_CHANNEL_PRESERVING = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Identity,
    nn.Dropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)


# ----------------------------------------------------------------- unstructured
def prunable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The weights (not biases) of every Conv1d/Conv2d/Linear, by ``state_dict`` name.

    The values are the live parameters: changing them changes the model.
    """
    return {
        f"{name}.weight" if name else "weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE_TYPES)
    }


def cubic_sparsity(
    round: int,  # t in Zhu & Gupta: a server round
    start_round: int,
    end_round: int,
    final_sparsity: float,
    initial_sparsity: float = 0.0,
) -> float:
    """Target sparsity at ``round`` on the cubic schedule of Zhu & Gupta 2017.

    ``s_t = s_f + (s_i − s_f)(1 − (t − t0)/n)³`` with ``t0 = start_round`` and
    ``n = end_round − start_round``; ``s_i`` up to ``start_round``, ``s_f`` from
    ``end_round`` on.
    """
    for label, value in (("final", final_sparsity), ("initial", initial_sparsity)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{label} sparsity must lie in [0, 1), got {value}")
    if end_round < start_round:
        raise ValueError(f"end_round {end_round} is before start_round {start_round}")
    if round >= end_round:
        return float(final_sparsity)
    if round <= start_round:
        return float(initial_sparsity)
    progress = (round - start_round) / (end_round - start_round)
    return float(final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3)


def magnitude_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    *,
    scope: Scope = "global",
    previous_masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Keep the weights with the largest ``|W|`` (Han et al. 2015).

    See `_masks_from_scores` for ``scope``, ties and ``previous_masks``.
    """
    scores = {name: w.detach().abs() for name, w in weights.items()}
    return _masks_from_scores(scores, sparsity, scope, previous_masks)


def movement_masks(
    weights: Mapping[str, Tensor],
    initial_weights: Mapping[str, Tensor],
    sparsity: float,
    *,
    scope: Scope = "global",
    previous_masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Prune the weights that moved least since ``initial_weights``: score ``|W − W0|``.

    The seed's definition (see the module docstring for how it differs from Sanh et
    al. 2020). See `_masks_from_scores` for ``scope``, ties and ``previous_masks``.
    """
    missing = sorted(set(weights) - set(initial_weights))
    if missing:
        raise KeyError(f"no initial weights for {missing}")
    scores = {}
    for name, w in weights.items():
        w0 = initial_weights[name]
        if w0.shape != w.shape:
            raise ValueError(f"'{name}': initial shape {tuple(w0.shape)} != {tuple(w.shape)}")
        scores[name] = (w.detach() - w0.detach().to(w.device)).abs()
    return _masks_from_scores(scores, sparsity, scope, previous_masks)


def _masks_from_scores(
    scores: Mapping[str, Tensor],
    sparsity: float,
    scope: Scope,
    previous_masks: Mapping[str, Tensor] | None,
) -> dict[str, Tensor]:
    """Prune the ``round(sparsity · n)`` lowest-scoring entries.

    ``scope="global"`` ranks all tensors together (in the mapping's order);
    ``scope="layer"`` prunes that fraction of every tensor separately; ``scope="lamp"``
    ranks all tensors together by their LAMP-normalised scores (`lamp_scores`).

    Ties: a stable sort over the flattened scores, so among equal scores the entry
    that comes first (earlier tensor, then lower C-order index) is pruned first; the
    same inputs always give the same masks.

    ``previous_masks``: an entry already pruned stays pruned, whatever its score now
    (a weight held at zero has no magnitude and has not moved, and un-pruning it would
    restore a meaningless value). Those entries count towards the target; if they
    already exceed it, nothing more is pruned and the sparsity stays where it was.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    if scope not in ("global", "layer", "lamp"):
        raise ValueError(f"scope must be 'global', 'layer' or 'lamp', got {scope!r}")
    ranked: dict[str, Tensor] = {}
    for name, score in scores.items():
        s = score.detach().to(torch.float64).clone()
        if scope == "lamp":
            s = lamp_scores(s)
        if previous_masks is not None and name in previous_masks:
            prev = previous_masks[name].to(device=s.device, dtype=torch.bool)
            if prev.shape != s.shape:
                raise ValueError(f"'{name}': previous mask {tuple(prev.shape)} != {tuple(s.shape)}")
            s[~prev] = -math.inf  # ranks below every real score: pruned first
        ranked[name] = s
    if scope == "layer":
        return {name: _keep_top(s.flatten(), sparsity).view(s.shape) for name, s in ranked.items()}
    if not ranked:
        return {}
    flat = _keep_top(torch.cat([s.flatten() for s in ranked.values()]), sparsity)
    masks, offset = {}, 0
    for name, s in ranked.items():
        masks[name] = flat[offset : offset + s.numel()].view(s.shape)
        offset += s.numel()
    return masks


def lamp_scores(scores: Tensor) -> Tensor:
    """LAMP (Lee et al. 2021, eq. 2): ``s_u² / Σ_{v ≥ u} s_v²`` with the entries of one
    tensor sorted ascending; the largest entry scores 1, an all-zero tensor 0."""
    flat = scores.detach().to(torch.float64).flatten() ** 2
    order = torch.argsort(flat, stable=True)
    ascending = flat[order]
    tail = torch.flip(torch.cumsum(torch.flip(ascending, [0]), 0), [0])  # Σ_{v ≥ u}
    normalised = torch.where(tail > 0, ascending / tail.clamp_min(1e-300), 0.0)
    out = torch.empty_like(flat)
    out[order] = normalised
    return out.view(scores.shape)


def _keep_top(scores: Tensor, sparsity: float) -> Tensor:
    n_prune = max(round(sparsity * scores.numel()), int(torch.isneginf(scores).sum()))
    order = torch.argsort(scores, stable=True)
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[order[:n_prune]] = False
    return keep


def sparsity_of(masks: Mapping[str, Tensor | np.ndarray]) -> float:
    """Fraction of pruned (``False``) entries over all masks together."""
    total = sum(int(m.size if isinstance(m, np.ndarray) else m.numel()) for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 0.0 if total == 0 else 1.0 - kept / total


@torch.no_grad()
def apply_masks(
    model_or_state: nn.Module | Mapping[str, Tensor | np.ndarray],
    masks: Mapping[str, Tensor | np.ndarray],
) -> None:
    """Zero, in place, every entry whose mask is ``False``.

    Accepts a module (its ``state_dict`` tensors share storage with the parameters) or
    a state dict of tensors or numpy arrays.
    """
    state: Mapping[str, Any] = (
        model_or_state.state_dict(keep_vars=True)
        if isinstance(model_or_state, nn.Module)
        else model_or_state
    )
    for name, mask in masks.items():
        if name not in state:
            raise KeyError(f"mask '{name}' names no tensor of the model/state")
        value = state[name]
        if tuple(value.shape) != tuple(mask.shape):
            raise ValueError(
                f"mask '{name}' has shape {tuple(mask.shape)}, tensor {tuple(value.shape)}"
            )
        if isinstance(value, np.ndarray):
            value[~np.asarray(mask, dtype=bool)] = 0
        else:
            keep = torch.as_tensor(mask, dtype=torch.bool, device=value.device)
            value.masked_fill_(~keep, 0)


class GradientMask:
    """Hooks that keep pruned weights at exactly zero during local training.

    Each masked parameter gets a gradient hook that multiplies its gradient by the
    mask, so no gradient (and no weight decay term, since ``wd · 0 = 0``) reaches a
    pruned weight. That alone is exact for a fresh optimizer, but an optimizer that
    carries momentum or Adam moments from before the weight was pruned would still
    move it; pass that ``optimizer`` and a step post-hook re-zeroes the pruned weights
    after every step. Call `remove` (or use it as a context manager) when done.
    """

    def __init__(
        self,
        model: nn.Module,
        masks: Mapping[str, Tensor],
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        params = dict(model.named_parameters())
        self._handles: list[RemovableHandle] = []
        self._masks: dict[str, Tensor] = {}
        self._params: dict[str, nn.Parameter] = {}
        for name, mask in masks.items():
            if name not in params:
                raise KeyError(f"mask '{name}' names no parameter of the model")
            param = params[name]
            if tuple(mask.shape) != tuple(param.shape):
                raise ValueError(
                    f"mask '{name}' has shape {tuple(mask.shape)}, param {tuple(param.shape)}"
                )
            keep = mask.to(device=param.device, dtype=param.dtype)
            self._masks[name] = keep
            self._params[name] = param
            self._handles.append(param.register_hook(_multiply_by(keep)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(self._rezero))
        apply_masks(model, masks)

    def _rezero(self, *_: Any) -> None:
        with torch.no_grad():
            for name, param in self._params.items():
                param.mul_(self._masks[name])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> GradientMask:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def _multiply_by(keep: Tensor) -> Any:
    def hook(grad: Tensor) -> Tensor:
        return grad * keep

    return hook


def mask_gradients(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> GradientMask:
    """Zero the masked weights now and keep them at zero through training.

    Returns a `GradientMask` whose ``remove()`` detaches the hooks; see it for why an
    optimizer with state from before pruning should be passed.
    """
    return GradientMask(model, masks, optimizer)


# ------------------------------------------------------------------- structured
def prune_filters(model: nn.Module, ratio: float) -> nn.Module:
    """A copy of ``model`` with the fraction ``ratio`` of each conv's filters removed.

    For the CNN1d/CNN2d families (`edgekd.learn.models`): a ``features`` Sequential of
    convolutions separated by channel-preserving modules (activations, pooling,
    identity), then ``flatten`` and a linear ``head``. In each conv the
    ``round(ratio · C_out)`` filters with the smallest L1 norm go (Li et al. 2017; at
    least one is kept; ties: the later channel goes first); the next conv loses the
    same input channels. The head's input is the flattened ``(C, L)`` map, feature
    index ``c · L + l`` (``L`` = positions per channel: the length for CNN1d, 1 after
    CNN2d's global average pooling), so it keeps the columns of the surviving channels.

    Surviving channels keep their order and weights; the result no longer matches
    ``ModelSpec.width``, so it cannot be rebuilt by `build_model`.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must lie in [0, 1), got {ratio}")
    features = getattr(model, "features", None)
    head = getattr(model, "head", None)
    if not isinstance(features, nn.Sequential) or not isinstance(head, nn.Linear):
        raise ValueError(
            "prune_filters needs a model with a 'features' Sequential and a Linear 'head'"
        )
    pruned = copy.deepcopy(model)
    new_features: nn.Sequential = pruned.features  # type: ignore[assignment]
    kept_in: Tensor | None = None  # surviving output channels of the previous conv
    for index, module in enumerate(list(new_features)):
        if isinstance(module, nn.Conv1d | nn.Conv2d):
            if module.groups != 1:
                raise ValueError(f"features.{index}: grouped convolutions are not supported")
            keep_out = _filters_to_keep(module.weight, ratio)
            new_features[index] = _sliced_conv(module, keep_out, kept_in)
            kept_in = keep_out
        elif not isinstance(module, _CHANNEL_PRESERVING):
            raise ValueError(
                f"features.{index} ({type(module).__name__}) may change channels; "
                "prune_filters handles convolutions, activations and pooling only"
            )
    if kept_in is not None:
        old_head: nn.Linear = pruned.head  # type: ignore[assignment]
        channels = _last_conv_channels(features)
        if old_head.in_features % channels:
            raise ValueError(
                f"head input {old_head.in_features} is not a multiple of {channels} channels"
            )
        positions = old_head.in_features // channels
        columns = (kept_in[:, None] * positions + torch.arange(positions)).flatten()
        pruned.head = _sliced_linear(old_head, columns)
    return pruned


def _filters_to_keep(weight: Tensor, ratio: float) -> Tensor:
    out_channels = weight.shape[0]
    n_keep = max(1, out_channels - round(ratio * out_channels))
    l1 = weight.detach().abs().flatten(1).sum(dim=1)
    order = torch.argsort(l1, descending=True, stable=True)  # equal norms: lower index stays
    return torch.sort(order[:n_keep]).values


def _sliced_conv(
    conv: nn.Conv1d | nn.Conv2d, keep_out: Tensor, keep_in: Tensor | None
) -> nn.Module:
    weight = conv.weight.detach()[keep_out]
    if keep_in is not None:
        weight = weight[:, keep_in]
    new = type(conv)(
        weight.shape[1],
        weight.shape[0],
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias.detach()[keep_out])
    return new


def _sliced_linear(linear: nn.Linear, columns: Tensor) -> nn.Linear:
    new = nn.Linear(len(columns), linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight.detach()[:, columns])
        if linear.bias is not None and new.bias is not None:
            new.bias.copy_(linear.bias.detach())
    return new


def _last_conv_channels(features: nn.Sequential) -> int:
    convs = [m for m in features if isinstance(m, nn.Conv1d | nn.Conv2d)]
    return int(convs[-1].out_channels)


# ------------------------------------------------------------------------- cost
@torch.no_grad()
def macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one sample through the conv and linear layers.

    Conv: ``out_elements · (C_in / groups) · Π kernel``; linear: ``out_elements ·
    in_features``. Counted by forward hooks on a batch of one zero input; activations,
    pooling and biases are not counted.
    """
    total = 0

    def count(module: nn.Module, _inp: Any, out: Tensor) -> None:
        nonlocal total
        per_sample = out[0].numel()
        if isinstance(module, nn.Linear):
            total += per_sample * module.in_features
        elif isinstance(module, nn.Conv1d | nn.Conv2d):
            total += (
                per_sample * (module.in_channels // module.groups) * math.prod(module.kernel_size)
            )

    handles = [m.register_forward_hook(count) for m in _layers(model)]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model(torch.zeros((1, *input_shape), device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def _layers(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if isinstance(m, PRUNABLE_TYPES))
