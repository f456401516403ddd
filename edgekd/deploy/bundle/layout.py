"""The bundle's layout and its verification: file names, roles, the manifest, and
`load_bundle`, which checks every file against the manifest's sha256 (and, with a key,
the manifest's signature) before anything in the bundle is trusted. What a device
imports first; no torch."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekd.core.errors import EdgeKDError
from edgekd.deploy.profiles import DeviceProfile, ProfileError, profile_from_dict
from edgekd.deploy.signing import SignatureError, verify_manifest

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
MANIFEST = "manifest.json"
CLIENT_TOML = "client.toml"
SERVICE = "edgekd-client.service"
README = "README.md"
PARITY_DATA = "parity.npz"
HEAD = "head.npz"
# Where the README and the systemd unit put things on the device.
DEVICE_ROOT = "/opt/edgekd"
DEVICE_BUNDLE = f"{DEVICE_ROOT}/bundle"
DEVICE_VENV = f"{DEVICE_ROOT}/venv"
DEFAULT_DEVICE_DATA_DIR = f"{DEVICE_ROOT}/data"
DEFAULT_SUPERLINK = "127.0.0.1:9092"  # Flower's Fleet API port; set the real host at build
# Test samples shipped for on-device parity checks: 1 000 resolve a 1-point accuracy
# drop (standard error ~1.3 points at 85 %) and keep mnist1d's parity.npz at ~200 kB.
PARITY_SAMPLES = 1000
# Roles of the model files; "inference" is the one the device serves with.
INFERENCE, REFERENCE, FEATURES, HEAD_STEP = "inference", "reference", "features", "head-step"
# The whole-student step (profile [training] mode = "full" on onnxruntime / LiteRT): the
# step graph (a .tflite file holds the `infer` signature too; ONNX has its own
# TRAIN_INFER graph), its input layout and the student's tensors it starts from.
TRAIN_STEP, TRAIN_INFER = "train-step", "train-infer"
STEP_LAYOUT, STEP_PARAMS = "step_layout.json", "step_params.npz"


class BundleError(EdgeKDError, ValueError):
    """A bundle cannot be built, or a bundle folder is missing, changed or malformed."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle folder and its manifest."""

    path: Path
    manifest: dict[str, Any]
    profile: DeviceProfile

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def inference_model(self) -> Path:
        return self.path / self.manifest["inference_model"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["model"]["input_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["model"]["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["model"]["class_names"])

    def files_with_role(self, *roles: str) -> list[str]:
        return [name for name, f in self.manifest["files"].items() if f.get("role") in roles]


@dataclass
class _Artifact:
    name: str
    data: bytes
    role: str = ""  # INFERENCE | REFERENCE | FEATURES | HEAD_STEP | TRAIN_STEP | TRAIN_INFER | ""
    precision: str = ""
    note: str = ""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ load / verify
_REQUIRED = ("format_version", "target", "profile", "inference_model", "model", "files")


def load_bundle(path: str | Path, *, verify_key: str | Path | None = None) -> Bundle:
    """Read and verify a bundle folder.

    ``verify_key``: a public key; the manifest must be signed by it
    (`edgekd.deploy.signing`), checked before anything in it is trusted.

    Raises:
        BundleError: no folder or manifest, malformed JSON, an unknown format version, a
            missing key, a listed file that is missing or changed (its sha256
            differs), or (with ``verify_key``) a missing or wrong signature; the message
            names the file. Files the manifest does not list (logs, say) are ignored.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise BundleError(f"bundle folder not found: {folder}")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{folder}: {MANIFEST} missing (not a bundle?)")
    if verify_key is not None:
        try:
            verify_manifest(folder, Path(verify_key))
        except SignatureError as exc:
            raise BundleError(str(exc)) from None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: malformed JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: expected a JSON object")
    version = manifest.get("format_version")
    if version != MANIFEST_VERSION:
        raise BundleError(
            f"{manifest_path}: unknown format_version {version!r} (this edgekd reads "
            f"{MANIFEST_VERSION}; rebuild the bundle or upgrade edgekd)"
        )
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise BundleError(f"{manifest_path}: key '{missing[0]}' missing")
    files = manifest["files"]
    if not isinstance(files, dict) or manifest["inference_model"] not in files:
        raise BundleError(f"{manifest_path}: 'files' does not list the inference model")
    for name, entry in files.items():
        target = folder / name
        if Path(name).name != name:
            raise BundleError(f"{manifest_path}: file name {name!r} is not a plain name")
        if not isinstance(entry, dict):
            raise BundleError(f"{manifest_path}: the entry of file {name} is not an object")
        if "role" in entry and not isinstance(entry.get("parity"), dict | None):
            raise BundleError(f"{manifest_path}: file {name}'s parity is not an object")
        if not target.is_file():
            raise BundleError(f"bundle {folder}: file {name} missing")
        digest = _sha256_file(target)
        if digest != entry.get("sha256"):
            raise BundleError(
                f"bundle {folder}: file {name} changed (sha256 {digest[:12]}..., "
                f"manifest says {str(entry.get('sha256'))[:12]}...)"
            )
    try:
        profile = profile_from_dict(manifest["profile"], source=f"{MANIFEST} profile")
    except ProfileError as exc:
        raise BundleError(f"{manifest_path}: {exc}") from None
    return Bundle(folder, manifest, profile)
