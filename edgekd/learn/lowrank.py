"""Low-rank factorization of linear and conv layers by truncated SVD.

A weight ``W ∈ R^{m×n}`` is replaced by its best rank-``r`` approximation (Eckart–Young):

    W ≈ U_r S_r V_rᵀ = (U_r S_r^{1/2}) (S_r^{1/2} V_rᵀ)

i.e. two layers, ``n → r`` without bias and ``r → m`` with the original bias, holding
``r(m + n)`` instead of ``m·n`` weights (Denton et al. 2014, "Exploiting Linear Structure
Within Convolutional Networks"; Xue et al. 2013 for linear layers). The singular values
are split evenly (``S^{1/2}`` on each side) so both factors have similar scale, which
keeps later fine-tuning well conditioned.

A convolution with ``C_out`` filters of ``C_in × k`` taps is the matrix
``(C_out, C_in·k)``; its factorization is a ``k``-tap convolution with ``r`` outputs (same
stride, padding, dilation) followed by a 1×1 convolution with the bias (Zhang et al. 2016,
"Accelerating Very Deep Convolutional Networks", the spatial-then-pointwise split).

The rank comes from a fixed ``rank`` or from the retained spectral energy:

    r(e) = min { r : Σ_{i≤r} σ_i² / Σ_i σ_i² ≥ e }

(the squared Frobenius norm of the approximation over that of ``W``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

_FACTORIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def rank_for_energy(singular_values: Tensor | np.ndarray, energy: float = 0.95) -> int:
    """Smallest ``r`` with ``Σ_{i≤r} σ_i² / Σ σ_i² ≥ energy`` (σ in descending order).

    A zero spectrum gives 1: a layer keeps at least one direction.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must lie in (0, 1], got {energy}")
    sigma = np.sort(np.abs(np.asarray(singular_values, dtype=np.float64)).ravel())[::-1]
    if sigma.size == 0:
        raise ValueError("no singular values")
    power = sigma**2
    total = power.sum()
    if total == 0.0:
        return 1
    # relative slack of a few ulps: energy=1.0 must not fail on rounding of the cumsum
    reached = np.cumsum(power) >= energy * total * (1.0 - 1e-12)
    return int(np.argmax(reached)) + 1


def _svd_factors(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(U_r S_r^{1/2}, S_r^{1/2} V_rᵀ, σ)`` of a 2-D weight, computed in float64."""
    u, s, vh = torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank], s


def factorize_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """``Linear(n, m)`` → ``Sequential(Linear(n, r, bias=False), Linear(r, m))``.

    At ``rank = min(m, n)`` the product reproduces the layer up to float rounding.
    """
    return _factorize_linear(layer, rank)[0]


def _factorize_linear(layer: nn.Linear, rank: int) -> tuple[nn.Sequential, Tensor]:
    m, n = layer.weight.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must lie in [1, {min(m, n)}], got {rank}")
    left, right, sigma = _svd_factors(layer.weight, rank)
    first = nn.Linear(n, rank, bias=False)
    second = nn.Linear(rank, m, bias=layer.bias is not None)
    dtype = layer.weight.dtype
    with torch.no_grad():
        first.weight.copy_(right.to(dtype))
        second.weight.copy_(left.to(dtype))
        if layer.bias is not None and second.bias is not None:
            second.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, second).to(layer.weight.device), sigma


def factorize_conv(conv: nn.Conv1d | nn.Conv2d, rank: int) -> nn.Sequential:
    """A ``k``-tap conv with ``rank`` outputs, then a 1×1 conv with the bias.

    The weight is viewed as the matrix ``(C_out, C_in·Π k)``; grouped convolutions are
    refused.
    """
    return _factorize_conv(conv, rank)[0]


def _factorize_conv(conv: nn.Conv1d | nn.Conv2d, rank: int) -> tuple[nn.Sequential, Tensor]:
    if conv.groups != 1:
        raise ValueError("grouped convolutions are not factorized")
    out_ch, in_ch = conv.out_channels, conv.in_channels
    matrix = conv.weight.detach().reshape(out_ch, -1)
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(f"rank must lie in [1, {min(matrix.shape)}], got {rank}")
    left, right, sigma = _svd_factors(matrix, rank)
    cls = type(conv)
    spatial = cls(
        in_ch,
        rank,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        bias=False,
        padding_mode=conv.padding_mode,
    )
    pointwise = cls(rank, out_ch, 1, bias=conv.bias is not None)
    dtype = conv.weight.dtype
    with torch.no_grad():
        spatial.weight.copy_(right.reshape(spatial.weight.shape).to(dtype))
        pointwise.weight.copy_(left.reshape(pointwise.weight.shape).to(dtype))
        if conv.bias is not None and pointwise.bias is not None:
            pointwise.bias.copy_(conv.bias.detach())
    return nn.Sequential(spatial, pointwise).to(conv.weight.device), sigma


def factorize_model(
    model: nn.Module,
    *,
    rank: int | None = None,
    energy: float | None = None,
    min_params_saving: bool = True,
    layers: Iterable[str] | None = None,
) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """A copy of ``model`` whose linear and conv layers are factorized.

    Exactly one of ``rank`` (clipped to each layer's full rank) or ``energy`` (see
    `rank_for_energy`) chooses each layer's rank. ``layers`` names the modules to try
    (default: every Linear/Conv1d/Conv2d, the ``head`` included). With
    ``min_params_saving`` a layer is only replaced when ``r(m + n) + bias < m·n + bias``.

    The report maps each tried layer to ``rank``, ``full_rank``, ``energy`` (retained
    ``Σ_{i≤r}σ_i²/Σσ_i²``), ``params_before``, ``params_after`` and ``factorized``
    (False: kept as is, ``params_after == params_before``). Replaced modules become a
    two-element Sequential at the same path (``head`` → ``head.0``, ``head.1``).
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank or energy")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    new_model = copy.deepcopy(model)
    wanted = set(layers) if layers is not None else None
    candidates = [
        (name, module)
        for name, module in new_model.named_modules()
        if isinstance(module, _FACTORIZABLE) and (wanted is None or name in wanted)
    ]
    if wanted is not None:
        unknown = sorted(wanted - {name for name, _ in candidates})
        if unknown:
            raise ValueError(f"no linear/conv layer named {unknown}")
    report: dict[str, dict[str, Any]] = {}
    for name, module in candidates:
        matrix = module.weight.detach().reshape(module.weight.shape[0], -1)
        full_rank = min(matrix.shape)
        sigma = torch.linalg.svdvals(matrix.to(torch.float64))
        r = min(rank, full_rank) if rank is not None else rank_for_energy(sigma, energy or 0.0)
        bias = 0 if module.bias is None else module.bias.numel()
        before = matrix.numel() + bias
        after = r * sum(matrix.shape) + bias
        power = sigma**2
        kept_energy = float(power[:r].sum() / power.sum()) if float(power.sum()) > 0 else 1.0
        replace = after < before or not min_params_saving
        if replace and isinstance(module, nn.Linear):
            new_model.set_submodule(name, _factorize_linear(module, r)[0])
        elif replace and isinstance(module, nn.Conv1d | nn.Conv2d) and module.groups == 1:
            new_model.set_submodule(name, _factorize_conv(module, r)[0])
        else:
            replace = False
        report[name] = {
            "rank": r,
            "full_rank": full_rank,
            "energy": kept_energy,
            "params_before": before,
            "params_after": after if replace else before,
            "factorized": replace,
        }
    return new_model, report
