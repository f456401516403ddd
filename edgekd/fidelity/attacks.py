"""Robustness probes that need a torch model: FGSM, PGD, head features, layer sensitivity.

Kept apart from the numpy-only `edgekd.fidelity.scores` so that module still runs where
torch is absent; `edgekd.inspection` imports this one only for torch students.

Attacks are untargeted L-infinity attacks on the model's input, maximising the
cross-entropy of the true class (FGSM: Goodfellow et al., "Explaining and Harnessing
Adversarial Examples", ICLR 2015; PGD: Madry et al., "Towards Deep Learning Models
Resistant to Adversarial Attacks", ICLR 2018). Inputs are not clipped to a data range:
mnist1d signals are real-valued and unbounded, so the L-infinity ball is the only
constraint.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "fgsm_accuracy",
    "head_features",
    "layer_sensitivity",
    "parameterised_layers",
    "pgd_accuracy",
]

# Samples per forward/backward pass: the CNNs of edgekd.learn.models on 4000 mnist1d
# samples fit in one pass, and larger inputs stay within a few hundred MB.
_BATCH = 2048


def _as_tensors(x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> tuple[Tensor, Tensor]:
    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x, dtype=torch.float32)
    yt = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y, dtype=torch.long)
    if xt.shape[0] != yt.shape[0]:
        raise ValueError(f"x has {xt.shape[0]} samples but y has {yt.shape[0]}")
    return xt, yt


def _input_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """d CE(model(x), y) / dx, without touching the parameters' ``.grad``."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        # Summed, not averaged, loss: only the gradient's sign is used, and a mean would
        # shrink it by the batch size towards float32 underflow.
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> int:
    with torch.no_grad():
        return int((model(x).argmax(dim=1) == y).sum())


def fgsm_accuracy(
    model: nn.Module, x: np.ndarray | Tensor, y: np.ndarray | Tensor, eps: float
) -> float:
    """Accuracy under the fast gradient sign method (Goodfellow et al., 2015).

    ::

        x_adv = x + eps * sign(grad_x CE(f(x), y))

    Args:
        model: Classifier returning logits; put in eval mode.
        x: Inputs, shape ``[N, ...]``.
        y: Integer labels, shape ``[N]``.
        eps: L-infinity radius ``>= 0``; 0 gives the clean accuracy.

    Returns:
        Share of samples still classified correctly.
    """
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    xt, yt = _as_tensors(x, y)
    model.eval()
    correct = 0
    for start in range(0, len(yt), _BATCH):
        xb, yb = xt[start : start + _BATCH], yt[start : start + _BATCH]
        adv = xb + eps * _input_gradient(model, xb, yb).sign() if eps > 0 else xb
        correct += _accuracy(model, adv, yb)
    return correct / max(len(yt), 1)


def pgd_accuracy(
    model: nn.Module,
    x: np.ndarray | Tensor,
    y: np.ndarray | Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    seed: int = 0,
) -> float:
    """Accuracy under L-infinity projected gradient descent (Madry et al., 2018, eq. 2).

    ::

        x_0     = x + U(-eps, eps)                               (random start)
        x_{t+1} = Proj_{||x' - x||_inf <= eps}(x_t + a * sign(grad_x CE(f(x_t), y)))

    with step ``a = step_size`` (default ``eps / 4``, so 10 steps can cross the ball
    2.5 times). The random start is drawn from a generator seeded with ``seed``.

    Args:
        model: Classifier returning logits; put in eval mode.
        x: Inputs, shape ``[N, ...]``.
        y: Integer labels, shape ``[N]``.
        eps: L-infinity radius ``>= 0``.
        steps: Number of gradient steps ``>= 1``.
        step_size: ``a``; None for ``eps / 4``.
        seed: Seed of the random start.

    Returns:
        Share of samples classified correctly at the last iterate.
    """
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    alpha = eps / 4.0 if step_size is None else float(step_size)
    xt, yt = _as_tensors(x, y)
    model.eval()
    if eps == 0:
        return _accuracy(model, xt, yt) / max(len(yt), 1)
    generator = torch.Generator().manual_seed(seed)
    correct = 0
    for start in range(0, len(yt), _BATCH):
        xb, yb = xt[start : start + _BATCH], yt[start : start + _BATCH]
        noise = torch.rand(xb.shape, generator=generator, dtype=xb.dtype) * 2.0 - 1.0
        adv = xb + eps * noise
        for _ in range(steps):
            adv = adv + alpha * _input_gradient(model, adv, yb).sign()
            adv = xb + (adv - xb).clamp(-eps, eps)
        correct += _accuracy(model, adv, yb)
    return correct / max(len(yt), 1)


def head_features(
    model: nn.Module, x: np.ndarray | Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The input of ``model.head`` and the head's weight and bias, as float64 numpy.

    The input is read with a forward pre-hook on ``head`` (torchdistill style), so it is
    whatever ``forward`` feeds the head, here ``flatten(features(x), 1)``, without
    re-implementing ``forward``.

    A low-rank factorized head (``Sequential`` of Linears with nothing between them) is
    one linear map, ``W = W₂W₁``, ``b = W₂b₁ + b₂``, and is certified as such.

    Returns:
        ``(features [N, D], W [K, D], b [K])``.
    """
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} has no linear `head` to certify")
    weight, bias = _linear_map(head, type(model).__name__)
    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x, dtype=torch.float32)
    captured: list[Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
        captured.append(inputs[0].detach())

    handle = head.register_forward_pre_hook(hook)
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(xt), _BATCH):
                model(xt[start : start + _BATCH])
    finally:
        handle.remove()
    features = torch.cat(captured).double().numpy() if captured else np.zeros((0, weight.shape[1]))
    return features, weight, bias


def _linear_map(head: nn.Module, model_name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` of a Linear, or of a Sequential of Linears composed into one map."""
    modules = list(head) if isinstance(head, nn.Sequential) else [head]
    layers = [m for m in modules if isinstance(m, nn.Linear)]
    if not layers or len(layers) != len(modules):
        raise ValueError(f"{model_name} has no linear `head` to certify")
    weight = np.eye(layers[0].in_features)
    bias = np.zeros(layers[0].in_features)
    for layer in layers:
        w = layer.weight.detach().double().numpy()
        b = (
            layer.bias.detach().double().numpy()
            if layer.bias is not None
            else np.zeros(layer.out_features)
        )
        weight, bias = w @ weight, w @ bias + b
    return weight, bias


def parameterised_layers(model: nn.Module) -> list[str]:
    """Dotted paths of the modules that hold parameters themselves (not via children)."""
    return [
        name
        for name, module in model.named_modules()
        if name and any(True for _ in module.parameters(recurse=False))
    ]


def _replace_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def layer_sensitivity(
    reference_model: nn.Module,
    compressed_model: nn.Module | None,
    x: np.ndarray | Tensor,
    y: np.ndarray | Tensor,
    eps: float,
) -> list[dict[str, float | str]]:
    """Which single layer's compression moves FGSM robustness the most.

    For every parameterised layer ``l`` of ``reference_model`` (the FP32 student), a copy
    of the reference gets ``compressed_model``'s module at the same path, all else
    unchanged, and::

        delta_l = acc_FGSM(reference with layer l compressed, eps) - acc_FGSM(reference, eps)

    The module itself is swapped, not its weights, so a compressed layer of another type
    (e.g. a dynamically quantized Linear) is measured as it runs. Both models must share
    the architecture's module paths.

    Args:
        reference_model: The uncompressed model; not modified.
        compressed_model: The compressed model, or None to skip (returns ``[]``).
        x: Inputs, shape ``[N, ...]``.
        y: Integer labels, shape ``[N]``.
        eps: FGSM radius.

    Returns:
        One dict per layer with ``layer``, ``fgsm_accuracy``, ``reference_fgsm_accuracy``
        and ``delta``, sorted by ``|delta|``, largest first (ties by layer path).
    """
    if compressed_model is None:
        return []
    compressed_modules = dict(compressed_model.named_modules())
    reference_accuracy = fgsm_accuracy(reference_model, x, y, eps)
    rows: list[dict[str, float | str]] = []
    for path in parameterised_layers(reference_model):
        if path not in compressed_modules:
            raise ValueError(f"compressed model has no layer '{path}' to compare")
        swapped = copy.deepcopy(reference_model)
        _replace_submodule(swapped, path, copy.deepcopy(compressed_modules[path]))
        accuracy = fgsm_accuracy(swapped, x, y, eps)
        rows.append(
            {
                "layer": path,
                "fgsm_accuracy": accuracy,
                "reference_fgsm_accuracy": reference_accuracy,
                "delta": accuracy - reference_accuracy,
            }
        )
    rows.sort(key=lambda row: (-abs(float(row["delta"])), str(row["layer"])))
    return rows
