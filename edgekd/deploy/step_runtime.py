"""Torch-free training of the whole student on a device (onnxruntime, LiteRT).

The step graph is `edgekd.deploy.train_step.StudentKDStep` exported to ONNX or TFLite;
its interface is a `edgekd.deploy.step_layout.StepLayout`. This module holds:

* :class:`OrtStepRuntime`: onnxruntime, a ``train`` and an ``infer`` graph, dynamic batch;
* :class:`LiteRTStepRuntime`: one ``.tflite`` file with ``train`` and ``infer``
  signatures, static batch (short batches padded with label ``-1``, which the graph
  gives zero loss, gradient and count);
* :func:`local_full_kd`: the local epochs over shuffled mini-batches, one graph call
  per step, the optimizer state carried between calls.

numpy, onnxruntime and ``ai_edge_litert`` are imported lazily, torch never
(``tests/client/test_torch_free.py``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from edgekd.deploy.runtimes import (
    PAD_LABEL,
    _load_litert_interpreter,
    _positional_key,
    _signature_inputs,
)
from edgekd.deploy.step_layout import StepLayout

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "LiteRTStepRuntime",
    "OrtStepRuntime",
    "StepRuntime",
    "local_full_kd",
    "step_runtime_for",
]

#: Rows per inference call (bounds memory, not results).
_INFER_CHUNK = 1024


class StepRuntime(Protocol):
    """What :func:`local_full_kd` needs: one step and the logits.

    ``batch_size`` is the largest batch :meth:`step` accepts (``None``: any).
    """

    batch_size: int | None
    layout: StepLayout

    def step(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        """Run the step on feeds in ``layout.input_names()`` order; outputs in
        ``layout.output_names()`` order."""
        ...

    def logits(self, x: np.ndarray, params: list[np.ndarray]) -> np.ndarray:
        """The student's logits ``[N, C]`` with tensors ``params`` (layout order)."""
        ...


class OrtStepRuntime:
    """onnxruntime (CPU): ``train_step.onnx`` and ``infer.onnx``, dynamic batch."""

    batch_size: int | None = None

    def __init__(
        self, train: str | bytes, infer: str | bytes, layout: StepLayout, *, threads: int = 1
    ):
        """``train``/``infer``: file paths or the serialized graphs."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self.layout = layout
        self._train = ort.InferenceSession(train, sess_options=options, providers=providers)
        self._infer = ort.InferenceSession(infer, sess_options=options, providers=providers)
        # The exporter drops an input the graph never reads (SGD's `step`): feed by name.
        self._used = {i.name for i in self._train.get_inputs()}
        unknown = self._used - set(layout.input_names())
        if unknown:
            raise ValueError(
                f"the step graph does not match its layout: inputs {sorted(unknown)[:4]}"
            )

    def step(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        named = {
            name: np.asarray(f, np.int64 if i == 1 else np.float32)
            for i, (name, f) in enumerate(zip(self.layout.input_names(), feeds, strict=True))
            if name in self._used
        }
        return list(self._train.run(None, named))

    def logits(self, x: np.ndarray, params: list[np.ndarray]) -> np.ndarray:
        import numpy as np

        names = self.layout.infer_input_names()
        parts = [
            self._infer.run(
                None, dict(zip(names, [x[i : i + _INFER_CHUNK], *params], strict=True))
            )[0]
            for i in range(0, len(x), _INFER_CHUNK)
        ]
        return (
            np.concatenate(parts) if parts else np.zeros((0, self.layout.num_classes), np.float32)
        )


class LiteRTStepRuntime:
    """LiteRT: one ``.tflite`` file with ``train`` and ``infer`` signatures, static batch.

    A batch of ``n < B`` rows is padded: inputs with zeros, labels with ``-1``. Padded
    rows carry no loss, gradient or count, so the padded step is the unpadded one.
    """

    def __init__(self, model: str | bytes, layout: StepLayout, *, threads: int = 1):
        """``model``: the ``.tflite`` file's path or its bytes."""
        self.layout = layout
        self._interp = _load_litert_interpreter(model, threads)
        name = "the step file" if isinstance(model, bytes) else model
        missing = {"train", "infer"} - set(self._interp.get_signature_list())
        if missing:
            raise ValueError(f"{name} lacks the signature(s) {sorted(missing)}")
        self._train = self._interp.get_signature_runner("train")
        self._infer = self._interp.get_signature_runner("infer")
        self._train_inputs = _signature_inputs(self._train)
        self._infer_inputs = _signature_inputs(self._infer)
        if len(self._train_inputs) != len(layout.input_names()):
            raise ValueError(
                f"{name}: train signature has {len(self._train_inputs)} inputs, "
                f"its layout {len(layout.input_names())}"
            )
        self.batch_size: int | None = self._train_inputs[0][2][0]

    def _run(
        self, runner: Any, inputs: list[tuple[str, Any, tuple[int, ...]]], values: list[Any]
    ) -> list[np.ndarray]:
        import numpy as np

        feeds = {
            name: np.asarray(value, dtype=dtype).reshape(shape)
            for (name, dtype, shape), value in zip(inputs, values, strict=True)
        }
        result = runner(**feeds)
        return [result[k] for k in sorted(result, key=_positional_key)]

    def _pad(self, array: np.ndarray, fill: float) -> np.ndarray:
        import numpy as np

        assert self.batch_size is not None
        missing = self.batch_size - len(array)
        if missing < 0:
            raise ValueError(
                f"batch of {len(array)} rows exceeds the static batch {self.batch_size}"
            )
        if missing == 0:
            return array
        return np.concatenate([array, np.full((missing, *array.shape[1:]), fill, array.dtype)])

    def step(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        padded = [
            self._pad(feeds[0], 0.0),
            self._pad(feeds[1], PAD_LABEL),
            self._pad(feeds[2], 0.0),
        ]
        return self._run(self._train, self._train_inputs, padded + list(feeds[3:]))

    def logits(self, x: np.ndarray, params: list[np.ndarray]) -> np.ndarray:
        import numpy as np

        assert self.batch_size is not None
        parts = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start : start + self.batch_size]
            (out,) = self._run(self._infer, self._infer_inputs, [self._pad(chunk, 0.0), *params])
            parts.append(out[: len(chunk)])
        return (
            np.concatenate(parts) if parts else np.zeros((0, self.layout.num_classes), np.float32)
        )


def step_runtime_for(
    train_path: str, infer_path: str | None, layout: StepLayout, *, threads: int = 1
) -> StepRuntime:
    """LiteRT for a ``.tflite`` step file (both signatures in it), onnxruntime otherwise."""
    if str(train_path).endswith(".tflite"):
        return LiteRTStepRuntime(str(train_path), layout, threads=threads)
    if infer_path is None:
        raise ValueError("an ONNX step needs its inference graph too")
    return OrtStepRuntime(str(train_path), str(infer_path), layout, threads=threads)


def local_full_kd(
    runtime: StepRuntime,
    state: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    teacher_logits: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    temperature: float,
    alpha: float,
    class_weights: np.ndarray | None = None,
    masks: Mapping[str, np.ndarray] | None = None,
    clip_norm: float = 0.0,
    trust_correct: bool = False,
    weight_ce: bool = False,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    seed: int = 0,
) -> tuple[OrderedDict[str, np.ndarray], dict[str, float]]:
    """Train every tensor of the student on local data through the step graph; torch-free.

    The loss is `edgekd.learn.kd.class_balanced_kd_loss` (``teacher_logits`` softened
    at ``temperature`` inside the graph; ``class_weights`` ``None`` means all ones), the
    optimizer the layout's (fresh state, as the torch trainer makes one per call), with
    clipping at ``clip_norm`` (0: off); ``weight_ce`` applies the class weights to the
    CE term too (with ``alpha = 1``: the class-weighted CE of a FedAvg round). Each
    epoch visits the data in a fresh order from ``numpy.random.default_rng(seed)``;
    ``augment(batch, generator)`` (optional) returns an augmented copy of each
    mini-batch, drawing from a generator of its own (the soft targets stay the clean
    sample's, as on a torch node without a torch teacher). ``masks`` (``True`` kept)
    keep pruned entries at exactly zero. ``state`` holds at least the layout's tensors;
    other entries (buffers) come back unchanged.

    Returns the new state (same keys and order as ``state``) and metrics: ``loss`` (the
    last epoch's example-weighted mean of the batch losses, each before its step),
    ``steps`` and ``num-examples``.

    Raises:
        FloatingPointError: a step produced a non-finite loss.
    """
    import numpy as np

    layout = runtime.layout
    if epochs < 0 or batch_size <= 0:
        raise ValueError(f"epochs must be >= 0 and batch_size > 0, got {epochs}, {batch_size}")
    if runtime.batch_size is not None and batch_size > runtime.batch_size:
        raise ValueError(
            f"batch_size {batch_size} exceeds the graph's static batch {runtime.batch_size}"
        )
    f32 = np.float32
    params, keep = _tensors(layout, state, masks)
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    x = np.asarray(x, dtype=f32)
    teacher = np.asarray(teacher_logits, dtype=f32)
    if len(teacher) != len(y) or len(x) != len(y):
        raise ValueError(
            f"x, y and teacher_logits differ in length: {len(x)}, {len(y)}, {len(teacher)}"
        )
    cw = (
        np.ones(layout.num_classes, f32)
        if class_weights is None
        else np.asarray(class_weights, f32)
    )
    state1 = [np.zeros_like(p) for p in params]
    state2 = [np.zeros_like(p) for p in params]
    rng = np.random.default_rng(seed)
    aug_rng = np.random.default_rng(seed + 7919)
    count, steps, last = len(layout.names), 0, 0.0
    for _ in range(epochs if len(y) else 0):
        order = rng.permutation(len(y))
        running = 0.0
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            steps += 1
            scalars = [temperature, alpha, lr, clip_norm, steps, trust_correct, weight_ce]
            xb = x[idx] if augment is None else augment(x[idx], aug_rng)
            feeds = [xb, y[idx], teacher[idx], cw, *(np.asarray(float(s), f32) for s in scalars)]
            out = runtime.step(feeds + params + keep + state1 + state2)
            params = [np.asarray(o, f32) for o in out[:count]]
            state1 = list(out[count : 2 * count])
            state2 = list(out[2 * count : 3 * count])
            loss = float(np.asarray(out[-1]).reshape(-1)[0])
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss} during on-device training")
            running += loss * len(idx)
        last = running / len(y)
    new_state: OrderedDict[str, np.ndarray] = OrderedDict(
        (k, np.array(v, copy=True)) for k, v in state.items()
    )
    for name, p in zip(layout.names, params, strict=True):
        new_state[name] = p.astype(np.asarray(state[name]).dtype, copy=False)
    return new_state, {"loss": float(last), "steps": float(steps), "num-examples": float(len(y))}


def _tensors(
    layout: StepLayout, state: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray] | None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The layout's tensors from ``state`` and their masks (ones where none), float32,
    in layout order; a missing tensor or another shape is a ``ValueError``."""
    import numpy as np

    missing = [n for n in layout.names if n not in state]
    if missing:
        raise ValueError(f"the student lacks the tensors {missing} the step graph trains")
    params = [np.array(state[n], dtype=np.float32) for n in layout.names]
    for name, p, shape in zip(layout.names, params, layout.shapes, strict=True):
        if p.shape != shape:
            raise ValueError(f"{name} has shape {p.shape}, the step graph {shape}")
    keep = [
        np.ones(s, np.float32)
        if masks is None or n not in masks
        else np.asarray(masks[n], np.float32)
        for n, s in zip(layout.names, layout.shapes, strict=True)
    ]
    return params, keep
