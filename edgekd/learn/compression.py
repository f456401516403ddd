"""Compression recipes: what the server does to the student, and in which round.

One config table (`edgekd.core.config.CompressionConfig`) names the recipe::

    compression.prune    = "magnitude:0.9"   # or movement:<s>, filter:<ratio>
    compression.quantize = "int8"            # or ternary
    compression.lowrank  = "energy:0.95"     # or rank:<r>
    compression.start-round = 1              # first round trained with pruned weights
    compression.end-round   = 5              # final sparsity reached; QAT from here on

and `CompressionSchedule` carries it out on the server:

* **structural** steps (filter pruning, low-rank SVD) change the architecture, so they
  happen once, on the warm-started student before round 1 (`structural_compress`);
  nodes learn the new shapes from the round's shape manifest (`edgekd.wire.codec`) and
  build the same module tree with `edgekd.learn.models.model_for_state`;
* **unstructured** pruning follows Zhu & Gupta's cubic schedule: before round ``t``'s
  training the server computes masks at ``s_t = cubic_sparsity(t, start − 1, end, s_f)``
  (so ``start`` is the first round whose training sees pruned weights), zeroes the
  global student, and ships the masks as packed bits; clients keep masked weights at
  exactly zero (`edgekd.learn.pruning.GradientMask`), so their average is zero there
  too. Movement pruning scores ``|W − W0|`` against the global student entering round
  1; nothing has moved before round 1's training, so its first masks come a round later.
  ``start = 0`` moves the whole schedule into "round 0", the server's warm start: the
  student is pruned in `WARM_PRUNE_STEPS` cubic steps, each followed by
  `WARM_PRUNE_EPOCHS` epochs of KD on the public split under the masks, and every
  federated round trains at the final sparsity (movement then scores against the
  random initialisation). The masks are still the server's and still travel;
  nothing is sent twice while they change;
* **quantization**: from round ``end`` on clients train with fake-quantized weights
  (INT8 per-channel QAT, or ternary with the STE), and student values travel as INT8
  with per-channel scales in both directions whenever a quantizer is set.
  `finalize` turns the latent weights into the shipped ones (ternary projection).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from edgekd.core.config import CompressionConfig, parse_lowrank, parse_prune
from edgekd.learn.lowrank import factorize_model
from edgekd.learn.pruning import (
    GradientMask,
    apply_masks,
    cubic_sparsity,
    magnitude_masks,
    movement_masks,
    prunable_parameters,
    prune_filters,
    sparsity_of,
)
from edgekd.learn.quantization import TernaryWeight, prepare_qat, ternarize

Masks = dict[str, np.ndarray]
WARM_PRUNE_STEPS = 5  # start-round 0: cubic steps of server-side pruning after warm start
WARM_PRUNE_EPOCHS = 6  # public-split KD epochs under the masks after each step


@dataclass(frozen=True)
class CompressionSchedule:
    """A parsed recipe; see the module docstring for what each field does when."""

    prune_method: str = ""  # "" | magnitude | movement | filter
    prune_amount: float = 0.0  # final sparsity, or the filter ratio
    quantize: str = ""  # "" | int8 | ternary
    lowrank_kind: str = ""  # "" | energy | rank
    lowrank_value: float = 0.0
    start_round: int = 1
    end_round: int = 5

    @classmethod
    def from_config(cls, cfg: CompressionConfig) -> CompressionSchedule:
        method, amount = parse_prune(cfg.prune)
        kind, value = parse_lowrank(cfg.lowrank)
        return cls(method, amount, cfg.quantize, kind, value, cfg.start_round, cfg.end_round)

    @property
    def unstructured(self) -> bool:
        return self.prune_method in ("magnitude", "movement")

    @property
    def int8_wire(self) -> bool:
        """Student values travel as INT8 (per-channel scales) when a quantizer is set."""
        return self.quantize != ""

    @property
    def bits(self) -> int:
        return {"int8": 8, "ternary": 2}.get(self.quantize, 32)

    @property
    def prunes_in_warm_start(self) -> bool:
        """``start-round = 0``: the schedule runs on the server before round 1."""
        return self.unstructured and self.start_round == 0

    def sparsity_for(self, server_round: int) -> float:
        if not self.unstructured:
            return 0.0
        if self.prunes_in_warm_start:
            return self.prune_amount
        return cubic_sparsity(server_round, self.start_round - 1, self.end_round, self.prune_amount)

    def warm_start_sparsity(self, step: int) -> float:
        """Target sparsity after server-side step ``1..WARM_PRUNE_STEPS`` (start-round 0)."""
        return cubic_sparsity(step, 0, WARM_PRUNE_STEPS, self.prune_amount)

    def qat_for(self, server_round: int) -> str:
        """The quantizer clients train with in ``server_round`` ("" for none)."""
        return self.quantize if server_round >= self.end_round else ""


class Pruner:
    """Server-side mask state across rounds (masks only ever lose entries)."""

    def __init__(self, schedule: CompressionSchedule) -> None:
        self.schedule = schedule
        self.masks: dict[str, torch.Tensor] = {}
        self.initial: dict[str, torch.Tensor] | None = None  # W0 for movement pruning
        self._initial_round = 0

    @torch.no_grad()
    def step(self, server_round: int, model: nn.Module) -> Masks:
        """Update the masks for ``server_round``, zero ``model`` under them, and return
        them (numpy, ``True`` = kept); empty while the schedule has not started."""
        s = self.schedule
        if not s.unstructured:
            return {}
        weights = prunable_parameters(model)
        if self.initial is None:  # W0: the global student entering the first round
            self.initial = {k: w.detach().clone() for k, w in weights.items()}
            self._initial_round = server_round
        if server_round < s.start_round:
            return {}
        if s.prune_method == "movement" and server_round <= self._initial_round:
            # Nothing has moved yet: every score |W − W0| is 0 and the ranking would be
            # the tie order, pruning whole layers. Movement pruning starts a round later.
            return {}
        self.prune_to(s.sparsity_for(server_round), model)
        return self.numpy_masks()

    @torch.no_grad()
    def prune_to(self, target: float, model: nn.Module) -> None:
        """Masks at sparsity ``target`` (never un-pruning), applied to ``model``."""
        s = self.schedule
        weights = prunable_parameters(model)
        if self.initial is None:
            self.initial = {k: w.detach().clone() for k, w in weights.items()}
        previous = self.masks or None
        # LAMP-normalised global ranking: plain global ranking empties the head.
        if s.prune_method == "magnitude":
            self.masks = magnitude_masks(weights, target, scope="lamp", previous_masks=previous)
        else:
            self.masks = movement_masks(
                weights, self.initial, target, scope="lamp", previous_masks=previous
            )
        apply_masks(model, self.masks)

    def numpy_masks(self) -> Masks:
        return {k: m.cpu().numpy().astype(bool) for k, m in self.masks.items()}

    def state_dict(self) -> tuple[dict[str, np.ndarray], int]:
        """Masks (``mask/<name>``) and W0 (``initial/<name>``) as numpy, and W0's round:
        what a resumed server needs to go on pruning where it stopped."""
        out = {f"mask/{k}": v for k, v in self.numpy_masks().items()}
        for k, w in (self.initial or {}).items():
            out[f"initial/{k}"] = w.cpu().numpy()
        return out, self._initial_round

    def load_state_dict(self, state: Mapping[str, np.ndarray], initial_round: int) -> None:
        self.masks = {
            k[len("mask/") :]: torch.from_numpy(np.asarray(v, dtype=bool))
            for k, v in state.items()
            if k.startswith("mask/")
        }
        initial = {
            k[len("initial/") :]: torch.from_numpy(np.array(v))
            for k, v in state.items()
            if k.startswith("initial/")
        }
        self.initial = initial or None
        self._initial_round = initial_round

    @property
    def sparsity(self) -> float:
        return sparsity_of(self.masks)


def structural_compress(
    model: nn.Module, schedule: CompressionSchedule
) -> tuple[nn.Module, dict[str, Any]]:
    """Filter pruning and/or low-rank factorization of ``model`` (a copy), and a report."""
    info: dict[str, Any] = {}
    if schedule.prune_method == "filter":
        model = prune_filters(model, schedule.prune_amount)
        info["filter_ratio"] = schedule.prune_amount
    if schedule.lowrank_kind:
        kw: dict[str, Any] = (
            {"rank": int(schedule.lowrank_value)}
            if schedule.lowrank_kind == "rank"
            else {"energy": schedule.lowrank_value}
        )
        model, layers = factorize_model(model, **kw)
        info["lowrank"] = {name: r for name, r in layers.items() if r["factorized"]}
    return model, info


def keep_pruned_at_zero(model: nn.Module, masks: Mapping[str, Any]) -> GradientMask:
    """`GradientMask` for ``masks`` named as in the plain state dict, also on a
    ternary `training_view` (whose weight parameter is ``…parametrizations.weight.original``)."""
    params = dict(model.named_parameters())
    named: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        path, _, leaf = name.rpartition(".")
        latent = f"{path}.parametrizations.{leaf}.original"
        target = name if name in params else latent
        named[target] = torch.as_tensor(np.asarray(mask, dtype=bool))
    return GradientMask(model, named)


def training_view(model: nn.Module, quantizer: str) -> nn.Module:
    """The module to train in a QAT round: the model itself with ternary weight
    parametrizations (latent FP32 weights stay the parameters), or an INT8 fake-quant
    copy from `prepare_qat` (same parameter names); the model itself when ``""``."""
    if quantizer == "ternary":
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
                parametrize.register_parametrization(module, "weight", TernaryWeight())
        return model
    if quantizer == "int8":
        return prepare_qat(model)
    if quantizer:
        raise ValueError(f"unknown quantizer '{quantizer}'")
    return model


def plain_state(trained: nn.Module, names: list[str]) -> OrderedDict[str, np.ndarray]:
    """The latent float weights of a `training_view` module under the plain state
    ``names`` (observer buffers and parametrization wrappers dropped)."""
    params = dict(trained.named_parameters())
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name in names:
        module_path, _, leaf = name.rpartition(".")
        latent = f"{module_path}.parametrizations.{leaf}.original"
        tensor = params.get(name, params.get(latent))
        if tensor is None:
            tensor = trained.state_dict()[name]
        out[name] = tensor.detach().cpu().numpy().copy()
    return out


@torch.no_grad()
def finalize(model: nn.Module, schedule: CompressionSchedule, masks: Mapping[str, Any]) -> None:
    """Turn latent weights into shipped ones, in place: ternary projection of every
    conv/linear weight when the recipe is ternary, then the masks again."""
    if schedule.quantize == "ternary":
        for w in prunable_parameters(model).values():
            w.copy_(ternarize(w))
    if masks:
        apply_masks(model, masks)
