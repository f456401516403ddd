"""Torch-free runtimes that train the student's head on a device (onnxruntime, LiteRT).

A Raspberry Pi or a phone has no torch. It keeps the student's feature extractor
frozen and trains only the linear head with the class-balanced KD loss, one SGD step
per mini-batch, through a graph exported by `edgekd.deploy.head_step` (the gradient is
in closed form there). This module holds:

* :class:`EdgeRuntime`: the interface (features, one head step, head logits);
* :class:`OrtRuntime`: onnxruntime, dynamic batch;
* :class:`LiteRTRuntime`: LiteRT (TFLite) signatures, static batch, padded;
* :func:`inverse_frequency_class_weights`: re-exported from `edgekd.core.class_weights`;
* :func:`local_head_kd`: the local training loop over shuffled mini-batches.

numpy, onnxruntime and ``ai_edge_litert`` are imported lazily, and torch never, so this
module imports on a device without torch (``tests/client/test_torch_free.py``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

from edgekd.core.class_weights import inverse_frequency_class_weights
from edgekd.core.records import HEAD_STEP_INPUTS

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "HEAD_STEP_INPUTS",
    "EdgeRuntime",
    "LiteRTRuntime",
    "OrtRuntime",
    "inverse_frequency_class_weights",
    "local_head_kd",
    "runtime_for",
]

#: Label of a padded row: the step graph gives it zero loss, gradient and count.
PAD_LABEL = -1
#: Rows per onnxruntime call when extracting features (bounds memory, not results).
_ORT_FEATURE_CHUNK = 1024


class EdgeRuntime(Protocol):
    """What :func:`local_head_kd` needs from a device runtime.

    ``batch_size`` is the largest batch :meth:`head_step` accepts (``None``: any).
    """

    batch_size: int | None

    def features(self, x: np.ndarray) -> np.ndarray:
        """Frozen features ``[N, D]`` (float32) of inputs ``x`` ``[N, ...]``, any ``N``."""
        ...

    def head_step(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        teacher_logits: np.ndarray,
        weight: np.ndarray,
        bias: np.ndarray,
        class_weights: np.ndarray,
        temperature: float,
        alpha: float,
        lr: float,
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """One SGD step of the class-balanced KD loss: ``(new_weight, new_bias, loss)``."""
        ...

    def head_logits(self, features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """Head logits ``features @ weight.T + bias``, ``[N, C]``."""
        ...

    def logits(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """Student logits of inputs ``x`` with head ``(weight, bias)``."""
        ...


def _step_feeds(
    features: np.ndarray,
    labels: np.ndarray,
    teacher_logits: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    class_weights: np.ndarray,
    temperature: float,
    alpha: float,
    lr: float,
) -> list[np.ndarray]:
    import numpy as np

    f32 = np.float32
    return [
        np.ascontiguousarray(features, dtype=f32),
        np.ascontiguousarray(labels, dtype=np.int64),
        np.ascontiguousarray(teacher_logits, dtype=f32),
        np.ascontiguousarray(weight, dtype=f32),
        np.ascontiguousarray(bias, dtype=f32),
        np.ascontiguousarray(class_weights, dtype=f32),
        np.asarray(temperature, dtype=f32),
        np.asarray(alpha, dtype=f32),
        np.asarray(lr, dtype=f32),
    ]


class OrtRuntime:
    """onnxruntime (CPU) runtime: a feature-extractor ONNX and the head-step ONNX.

    Both files come from `edgekd.deploy.head_step` (``export_feature_extractor_onnx``,
    ``export_head_step_onnx``); both have a dynamic batch axis.
    """

    batch_size: int | None = None

    def __init__(self, features_onnx_path: str, head_step_onnx_path: str, *, threads: int = 1):
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
            raise ImportError(
                "the ONNX runtime needs onnxruntime: pip install onnxruntime"
            ) from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self._features = ort.InferenceSession(
            features_onnx_path, sess_options=options, providers=providers
        )
        self._step = ort.InferenceSession(
            head_step_onnx_path, sess_options=options, providers=providers
        )
        names = tuple(i.name for i in self._step.get_inputs())
        if names != HEAD_STEP_INPUTS:
            raise ValueError(f"{head_step_onnx_path} is not a head-step graph: inputs {names}")
        self._features_input = self._features.get_inputs()[0].name

    def features(self, x: np.ndarray) -> np.ndarray:
        import numpy as np

        x = np.ascontiguousarray(x, dtype=np.float32)
        parts = [
            self._features.run(None, {self._features_input: x[i : i + _ORT_FEATURE_CHUNK]})[0]
            for i in range(0, len(x), _ORT_FEATURE_CHUNK)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)

    def head_step(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        teacher_logits: np.ndarray,
        weight: np.ndarray,
        bias: np.ndarray,
        class_weights: np.ndarray,
        temperature: float,
        alpha: float,
        lr: float,
    ) -> tuple[np.ndarray, np.ndarray, float]:
        feeds = _step_feeds(
            features, labels, teacher_logits, weight, bias, class_weights, temperature, alpha, lr
        )
        new_weight, new_bias, loss = self._step.run(
            None, dict(zip(HEAD_STEP_INPUTS, feeds, strict=True))
        )
        return new_weight, new_bias, float(loss)

    def head_logits(self, features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        import numpy as np

        logits = np.asarray(features, dtype=np.float32) @ np.asarray(weight, dtype=np.float32).T
        return logits + np.asarray(bias, dtype=np.float32)

    def logits(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        return self.head_logits(self.features(x), weight, bias)


def _load_litert_interpreter(path: str | bytes, threads: int) -> Any:
    """A LiteRT interpreter of a ``.tflite`` file (its path, or its bytes)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise ImportError(
            "the LiteRT runtime needs the LiteRT interpreter: pip install ai-edge-litert"
        ) from exc
    source = {"model_content": path} if isinstance(path, bytes) else {"model_path": path}
    return Interpreter(**source, num_threads=threads)


def _positional_key(name: str) -> tuple[int, str]:
    """Sort key for converter names ``args_0, args_1, ...`` / ``output_0, ...`` by index."""
    tail = name.rsplit("_", 1)[-1]
    return (int(tail) if tail.isdigit() else -1, name)


def _signature_inputs(runner: Any) -> list[tuple[str, Any, tuple[int, ...]]]:
    """``(name, dtype, shape)`` of a signature's inputs, in the converted module's order.

    The converter names inputs ``args_0, args_1, ...`` after the module's arguments;
    sorting by that index (not by name, where ``args_10 < args_2``) restores the order.
    """
    details = runner.get_input_details()
    ordered = sorted(details.items(), key=lambda item: _positional_key(item[0]))
    return [(name, d["dtype"], tuple(int(s) for s in d["shape"])) for name, d in ordered]


class LiteRTRuntime:
    """LiteRT (TFLite) runtime: a feature-extractor file and a head file.

    The files come from `edgekd.deploy.tflite_export` (``export_features_tflite``,
    ``export_head_step_tflite``): the head file carries a ``train`` signature (one
    :class:`~edgekd.deploy.head_step.HeadKDStep`) and an ``infer`` signature (head
    logits with the weights as inputs).

    LiteRT graphs have a **static batch** ``B``. A shorter batch of ``n < B`` rows is
    padded: features and teacher logits with zeros and labels with ``-1``
    (:data:`PAD_LABEL`). The step graph gives such a row a zero one-hot, hence zero
    loss, zero gradient and no weight in the batch count ``n`` that normalizes the loss,
    so the padded step equals the unpadded one (tested against the ONNX step). Feature
    and logit outputs of padded rows are dropped.
    """

    def __init__(self, features_tflite_path: str, head_tflite_path: str, *, threads: int = 1):
        self._features_interp = _load_litert_interpreter(features_tflite_path, threads)
        self._head_interp = _load_litert_interpreter(head_tflite_path, threads)
        signatures = self._head_interp.get_signature_list()
        missing = {"train", "infer"} - set(signatures)
        if missing:
            raise ValueError(f"{head_tflite_path} lacks the signature(s) {sorted(missing)}")
        self._train = self._head_interp.get_signature_runner("train")
        self._infer = self._head_interp.get_signature_runner("infer")
        feature_signatures = list(self._features_interp.get_signature_list())
        if not feature_signatures:
            raise ValueError(f"{features_tflite_path} has no signature")
        self._features_runner = self._features_interp.get_signature_runner(feature_signatures[0])
        self._train_inputs = _signature_inputs(self._train)
        self._infer_inputs = _signature_inputs(self._infer)
        self._features_inputs = _signature_inputs(self._features_runner)
        if len(self._train_inputs) != len(HEAD_STEP_INPUTS):
            raise ValueError(
                f"{head_tflite_path}: train signature has {len(self._train_inputs)} inputs, "
                f"expected {len(HEAD_STEP_INPUTS)}"
            )
        self.batch_size: int | None = self._train_inputs[0][2][0]
        feature_batch = self._features_inputs[0][2][0]
        if feature_batch != self.batch_size:
            raise ValueError(
                f"static batch sizes differ: features {feature_batch}, head {self.batch_size}"
            )

    @staticmethod
    def _outputs(result: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [result[k] for k in sorted(result, key=_positional_key)]

    def _run(
        self, runner: Any, inputs: list[tuple[str, Any, tuple[int, ...]]], values: list[np.ndarray]
    ) -> list[np.ndarray]:
        import numpy as np

        feeds = {
            name: np.asarray(value, dtype=dtype).reshape(shape)
            for (name, dtype, shape), value in zip(inputs, values, strict=True)
        }
        return self._outputs(runner(**feeds))

    def _pad(self, array: np.ndarray, fill: float) -> np.ndarray:
        import numpy as np

        assert self.batch_size is not None
        missing = self.batch_size - len(array)
        if missing == 0:
            return array
        pad = np.full((missing, *array.shape[1:]), fill, dtype=array.dtype)
        return np.concatenate([array, pad])

    def _check_batch(self, rows: int) -> None:
        assert self.batch_size is not None
        if rows > self.batch_size:
            raise ValueError(
                f"batch of {rows} rows exceeds the graph's static batch {self.batch_size}"
            )

    def features(self, x: np.ndarray) -> np.ndarray:
        import numpy as np

        assert self.batch_size is not None
        x = np.asarray(x, dtype=np.float32)
        parts = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start : start + self.batch_size]
            (out,) = self._run(self._features_runner, self._features_inputs, [self._pad(chunk, 0)])
            parts.append(out[: len(chunk)])
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)

    def head_step(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        teacher_logits: np.ndarray,
        weight: np.ndarray,
        bias: np.ndarray,
        class_weights: np.ndarray,
        temperature: float,
        alpha: float,
        lr: float,
    ) -> tuple[np.ndarray, np.ndarray, float]:
        self._check_batch(len(labels))
        feeds = _step_feeds(
            features, labels, teacher_logits, weight, bias, class_weights, temperature, alpha, lr
        )
        feeds[0] = self._pad(feeds[0], 0.0)
        feeds[1] = self._pad(feeds[1], PAD_LABEL)
        feeds[2] = self._pad(feeds[2], 0.0)
        new_weight, new_bias, loss = self._run(self._train, self._train_inputs, feeds)
        return new_weight, new_bias, float(loss.reshape(-1)[0])

    def head_logits(self, features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        import numpy as np

        assert self.batch_size is not None
        features = np.asarray(features, dtype=np.float32)
        parts = []
        for start in range(0, len(features), self.batch_size):
            chunk = features[start : start + self.batch_size]
            (out,) = self._run(
                self._infer, self._infer_inputs, [self._pad(chunk, 0.0), weight, bias]
            )
            parts.append(out[: len(chunk)])
        num_classes = len(bias)
        return np.concatenate(parts) if parts else np.zeros((0, num_classes), dtype=np.float32)

    def logits(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        return self.head_logits(self.features(x), weight, bias)


def runtime_for(features_path: str, head_step_path: str, *, threads: int = 1) -> EdgeRuntime:
    """The runtime for a bundle's feature extractor and head step: LiteRT for ``.tflite``
    files, onnxruntime otherwise."""
    if str(features_path).endswith(".tflite"):
        return LiteRTRuntime(str(features_path), str(head_step_path), threads=threads)
    return OrtRuntime(str(features_path), str(head_step_path), threads=threads)


def local_head_kd(
    runtime: EdgeRuntime,
    x: np.ndarray,
    y: np.ndarray,
    teacher_logits: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    temperature: float,
    alpha: float,
    class_weights: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Train the head ``(weight, bias)`` on local data with plain SGD; torch-free.

    The features of ``x`` are computed once (the extractor is frozen); each epoch visits
    the data in a fresh shuffled order (``numpy.random.default_rng(seed)``) in mini-batches
    of ``batch_size``, the last one possibly shorter. Each mini-batch is one step of
    `edgekd.deploy.head_step.HeadKDStep`: the class-balanced KD loss
    ``alpha * CE + (1 - alpha) * tau^2 * w_y * KL(softmax(t / tau) || softmax(z / tau))``
    with ``teacher_logits`` ``t`` softened inside the graph (Hinton et al., 2015).
    ``class_weights`` ``None`` means no class weighting (all ones).
    With teacher *probabilities* ``p`` at ``temperature`` instead of logits (the server's
    ``proxy`` soft-target mode), pass ``temperature * log(p)``: the graph's
    ``softmax(t / tau)`` then gives back ``p`` exactly.

    Returns:
        ``(weight, bias, metrics)``; metrics hold ``loss`` (example-weighted mean of the
        last epoch's batch losses, each at the weights before its step, as in
        `edgekd.learn.training.kd_train`), ``steps``, ``num-examples`` and ``accuracy``
        (of the trained head on the local data).

    Raises:
        FloatingPointError: a step produced a non-finite loss.
    """
    import numpy as np

    if epochs < 0 or batch_size <= 0:
        raise ValueError(f"epochs must be >= 0 and batch_size > 0, got {epochs}, {batch_size}")
    if runtime.batch_size is not None and batch_size > runtime.batch_size:
        raise ValueError(
            f"batch_size {batch_size} exceeds the runtime's static batch {runtime.batch_size}"
        )
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    teacher = np.asarray(teacher_logits, dtype=np.float32)
    if len(teacher) != len(y) or len(x) != len(y):
        raise ValueError(
            f"x, y and teacher_logits differ in length: {len(x)}, {len(y)}, {len(teacher)}"
        )
    w = np.array(weight, dtype=np.float32)
    b = np.array(bias, dtype=np.float32)
    num_classes = w.shape[0]
    cw = (
        np.ones(num_classes, dtype=np.float32)
        if class_weights is None
        else np.asarray(class_weights, dtype=np.float32)
    )
    if len(y) == 0:
        return w, b, {"loss": 0.0, "steps": 0.0, "num-examples": 0.0, "accuracy": 0.0}

    feats = runtime.features(x)
    rng = np.random.default_rng(seed)
    steps = 0
    last = 0.0
    for _ in range(epochs):
        order = rng.permutation(len(y))
        running = 0.0
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            w, b, loss = runtime.head_step(
                feats[idx], y[idx], teacher[idx], w, b, cw, temperature, alpha, lr
            )
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss} during on-device head training")
            running += loss * len(idx)
            steps += 1
        last = running / len(y)
    predictions = runtime.head_logits(feats, w, b).argmax(axis=1)
    accuracy = float((predictions == y).mean())
    metrics = {
        "loss": float(last),
        "steps": float(steps),
        "num-examples": float(len(y)),
        "accuracy": accuracy,
    }
    return w, b, metrics
