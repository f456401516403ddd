"""Numerically stable softmax for numpy logits: the one the server, torch nodes and
torch-free nodes all use, so a probability means the same thing everywhere."""

from __future__ import annotations

import numpy as np

__all__ = ["log_softmax", "softmax"]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(z / T)`` over the last axis of ``[N, K]`` logits, as float32.

    The row maximum is subtracted first, so large logits do not overflow ``exp``.
    """
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``log softmax(z)`` of ``[N, K]`` logits, in their dtype: ``z - max - log Σ exp``."""
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
