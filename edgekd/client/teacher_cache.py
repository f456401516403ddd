"""On-device teacher: the ONNX teacher arrives once, is cached by its sha256, and
produces soft targets with onnxruntime (no torch needed on the device). In a fleet a
narrower class's round may also bring a peer student (`round_teacher_logits`)."""

from __future__ import annotations

import hashlib
import lzma
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.core import records as R
from edgekd.core.data import cache_dir
from edgekd.core.errors import EdgeKDError


class TeacherMissingError(EdgeKDError, RuntimeError):
    """The round needs a teacher this node has not cached, and none was attached."""


_SESSIONS: dict[str, Any] = {}


def _teacher_path(digest: str) -> Path:
    return cache_dir() / "teachers" / f"{digest}.onnx"


def teacher_session(digest: str, onnx_bytes: bytes | None) -> Any:
    """The onnxruntime session for teacher ``digest``; stores ``onnx_bytes`` if given."""
    if digest in _SESSIONS:
        return _SESSIONS[digest]
    path = _teacher_path(digest)
    if onnx_bytes is not None:
        actual = hashlib.sha256(onnx_bytes).hexdigest()
        if actual != digest:
            raise ValueError(f"teacher bytes hash {actual[:12]} != announced {digest[:12]}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(onnx_bytes)
        os.replace(tmp.name, path)
    if not path.exists():
        raise TeacherMissingError(f"teacher {digest[:12]} is not cached on this node")
    session = _cpu_session(str(path))
    _SESSIONS[digest] = session
    return session


def _cpu_session(model: str | bytes) -> Any:
    """A one-thread onnxruntime CPU session on a model file's path or its bytes."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError(
            "the on-device teacher needs onnxruntime: pip install 'edgekd[edge]'"
        ) from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def teacher_logits(session: Any, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The teacher's logits ``[N, K]`` on ``x``, in batches; ``[0, K]`` for no samples (a
    node whose share is empty replies with 0 examples rather than failing here)."""
    name = session.get_inputs()[0].name
    if len(x) == 0:
        return np.zeros((0, int(session.get_outputs()[0].shape[-1])), dtype=np.float32)
    parts = [
        session.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(parts).astype(np.float32)


def round_teacher_logits(content: Any, config: Any, x: np.ndarray) -> np.ndarray:
    """The logits a node distils toward this round, on ``x`` (float32 ``[N, K]``).

    The teacher's (attached xz-compressed, or cached by ``kd.teacher-hash``); in a fleet
    whose server attached ``R.PEER`` (the widest class's current student, for a narrower
    class), ``(1 - w) * teacher + w * peer`` with ``w = fleet.peer-weight``; at ``w = 1``
    (the default) the teacher is not run. The peer changes every round, so its session
    lives for this call only and nothing is cached.
    """
    attached = content.array_records.get(R.TEACHER)
    blob = lzma.decompress(attached[R.TEACHER_ONNX].numpy().tobytes()) if attached else None
    teacher = teacher_session(str(config[R.TEACHER_HASH]), blob)
    peer = content.array_records.get(R.PEER)
    if peer is None:
        return teacher_logits(teacher, x)
    weight = float(config[R.PEER_WEIGHT])
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"{R.PEER_WEIGHT} must be in [0, 1], got {weight}")
    session = _cpu_session(lzma.decompress(peer[R.TEACHER_ONNX].numpy().tobytes()))
    peer_logits = teacher_logits(session, x)
    expected = (len(x), int(teacher.get_outputs()[0].shape[-1]))
    if peer_logits.shape != expected:
        raise ValueError(f"the peer student gives logits {peer_logits.shape}, not {expected}")
    if weight == 1.0:
        return peer_logits
    logits = teacher_logits(teacher, x)
    return ((1.0 - weight) * logits + weight * peer_logits).astype(np.float32)
