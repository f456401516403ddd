"""Device bundles: a folder with everything one device needs to join the federation.

`build_bundle` turns a student checkpoint into a bundle for a device profile
(`edgekd.deploy.profiles`), `load_bundle` verifies one (every file against the sha256 in
its manifest) and `check_bundle` re-runs parity and measures latency on the host it
runs on, the device itself included (no torch needed for onnxruntime/LiteRT bundles).

A bundle for ``raspberry-pi`` holds::

    manifest.json          format version, sha256 + size of every other file, the profile,
                           input shape, class names, num_features/num_classes, parity numbers
    student_int8.onnx      inference model (INT8 static QDQ, per-channel weights)
    student_fp32.onnx      the FP32 export, the reference the INT8 model is judged against
    features.onnx          frozen feature extractor  } head-only on-device KD
    head_step.onnx         one class-weighted KD SGD step of the linear head (weights as inputs)
    head.npz               initial head weights: weight [C, D], bias [C]
    parity.npz             up to PARITY_SAMPLES test inputs, labels and the torch logits
    client.toml            SuperLink address, backend, model files, data folder, TLS/auth paths
    edgekd-client.service  systemd unit (raspberry-pi, jetson)
    README.md              copy, install, start, logs: for the person at the device

``android`` ships ``student.tflite`` (+ ``student_int8.tflite`` when the converter gives
INT8 weights), ``features.tflite`` and ``head_step.tflite`` (static batch =
the profile's training batch size) instead of the ONNX files; ``jetson`` ships
``student.pt`` and ``student_fp32.onnx`` (full local KD in torch, no head files).

Data. The calibration set (the run's server-held ``public`` split, at most
`CALIBRATION_SAMPLES`) and the parity set (the devices' ``test`` split) are rebuilt by
`edgekd.core.data.load_federated_data` from the run's config, read from
``report.json`` in ``run_dir`` (default: the checkpoint's folder). Without a report the
default config's data is used and the manifest says so. ``parity.npz`` carries a slice
of the test split with the torch logits so that a device without torch or the dataset
package can re-check parity (`check_bundle`).

Writes go to a temporary sibling folder that is renamed into place at the end, so an
interrupted or failed build never leaves half a bundle; an existing non-empty folder
is replaced only with ``force=True`` and only if it is a bundle (has a manifest).
"""

from __future__ import annotations

from edgekd.deploy.bundle.build import _run_config, build_bundle, slim_onnx
from edgekd.deploy.bundle.check import check_bundle
from edgekd.deploy.bundle.layout import (
    DEFAULT_DEVICE_DATA_DIR,
    DEFAULT_SUPERLINK,
    MANIFEST_VERSION,
    PARITY_SAMPLES,
    Bundle,
    BundleError,
    load_bundle,
)

__all__ = [
    "DEFAULT_DEVICE_DATA_DIR",
    "DEFAULT_SUPERLINK",
    "MANIFEST_VERSION",
    "PARITY_SAMPLES",
    "Bundle",
    "BundleError",
    "_run_config",
    "build_bundle",
    "check_bundle",
    "load_bundle",
    "slim_onnx",
]
