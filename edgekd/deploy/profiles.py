"""Device profiles: what runtime, precision and thresholds a bundle for a target uses.

A profile is a TOML file (the shipped ones live in ``edgekd/deploy/profiles/``:
``raspberry-pi``, ``android``, ``jetson``) parsed once into a frozen `DeviceProfile`.
Every key is required and checked; a bad one raises `ProfileError` naming the key and
the file, e.g. ``jetson.toml: parity.max_top1_disagreement must be in [0, 1], got 2``.

Layout of a profile file::

    name, description
    [runtime]  backend, execution_providers, device, precision, quantization, threads,
               fallback_precision (optional), alternative (optional)
    [training] mode ("head-only" | "full"), batch_size
    [parity]   max_abs_logit_diff_fp32, max_top1_disagreement, max_accuracy_drop
    [budget]   max_model_bytes, max_memory_mb

torch-free and flwr-free: a device reads its profile from its bundle's manifest.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edgekd.core.errors import EdgeKDError

__all__ = [
    "BACKENDS",
    "Budget",
    "DeviceProfile",
    "ParityThresholds",
    "ProfileError",
    "list_profiles",
    "load_profile",
    "profile_from_dict",
]

BACKENDS = ("onnxruntime", "litert", "torch")
PRECISIONS = ("fp32", "fp16", "int8", "int8-weights")
TRAINING_MODES = ("head-only", "full")
DEVICES = ("cpu", "cuda")


class ProfileError(EdgeKDError, ValueError):
    """A device profile is missing, unreadable or has a bad field; one line."""


@dataclass(frozen=True)
class ParityThresholds:
    """How far an exported model may stray from the FP32 torch student on the test split."""

    max_abs_logit_diff_fp32: float  # FP32 exports only: max |z_export - z_torch| over all logits
    max_top1_disagreement: float  # share of samples whose top-1 differs from torch's
    max_accuracy_drop: float  # torch accuracy minus export accuracy (absolute)


@dataclass(frozen=True)
class Budget:
    max_model_bytes: int  # size of the inference model file
    max_memory_mb: float  # resident memory growth of loading and running it


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    backend: str  # onnxruntime | litert | torch
    execution_providers: tuple[str, ...]  # onnxruntime providers, in preference order
    device: str  # cpu | cuda
    precision: str  # fp32 | fp16 | int8 | int8-weights: what the target wants
    quantization: str  # how that precision is reached (free text, recorded in the manifest)
    threads: int  # intra-op threads of the runtime on the device
    training_mode: str  # head-only | full
    training_batch_size: int  # also the static batch of LiteRT training graphs
    parity: ParityThresholds
    budget: Budget
    fallback_precision: str = ""  # used (and stated) when the wanted precision is unavailable
    alternative: str = ""  # another backend the bundle also supports
    source: str = ""  # file the profile was read from

    def to_dict(self) -> dict[str, Any]:
        """The profile in its TOML layout (what `profile_from_dict` reads back)."""
        runtime: dict[str, Any] = {
            "backend": self.backend,
            "execution_providers": list(self.execution_providers),
            "device": self.device,
            "precision": self.precision,
            "quantization": self.quantization,
            "threads": self.threads,
        }
        if self.fallback_precision:
            runtime["fallback_precision"] = self.fallback_precision
        if self.alternative:
            runtime["alternative"] = self.alternative
        return {
            "name": self.name,
            "description": self.description,
            "runtime": runtime,
            "training": {"mode": self.training_mode, "batch_size": self.training_batch_size},
            "parity": asdict(self.parity),
            "budget": asdict(self.budget),
        }


def _profile_dir() -> Path:
    return Path(str(resources.files("edgekd.deploy") / "profiles"))


def list_profiles() -> list[str]:
    """Names of the profiles shipped with edgekd, sorted."""
    return sorted(p.stem for p in _profile_dir().glob("*.toml"))


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A shipped profile by name (``"raspberry-pi"``) or any profile TOML by path.

    Raises:
        ProfileError: unknown name, missing file, invalid TOML or a bad field; the
            message names the file and the field.
    """
    text = str(name_or_path)
    looks_like_path = text.endswith(".toml") or "/" in text or "\\" in text
    path = Path(text) if looks_like_path else _profile_dir() / f"{text}.toml"
    if not path.is_file():
        if looks_like_path:
            raise ProfileError(f"profile file not found: {path}")
        raise ProfileError(
            f"unknown device profile '{text}' (known: {', '.join(list_profiles())}; "
            "or give a path to a .toml file)"
        )
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path.name}: not valid TOML: {exc}") from None
    return profile_from_dict(raw, source=str(path))


# ------------------------------------------------------------------ validation
class _Reader:
    """Typed access to one TOML table that names the file and key in every error."""

    def __init__(self, table: Any, prefix: str, where: str) -> None:
        if not isinstance(table, dict):
            raise ProfileError(f"{where}: '{prefix.rstrip('.')}' must be a table")
        self.table, self.prefix, self.where = table, prefix, where
        self.seen: set[str] = set()

    def unknown(self) -> None:
        """Refuse keys nobody read: a misspelt optional key must not pass silently."""
        extra = sorted(set(self.table) - self.seen)
        if extra:
            raise ProfileError(f"{self.where}: unknown key {self.prefix}{extra[0]}")

    def _fail(self, key: str, problem: str) -> ProfileError:
        return ProfileError(f"{self.where}: {self.prefix}{key} {problem}")

    def _get(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        if key not in self.table:
            if default is None:
                raise self._fail(key, "is missing")
            return default
        return self.table[key]

    def table_of(self, key: str) -> _Reader:
        self.seen.add(key)
        if key not in self.table:
            raise ProfileError(f"{self.where}: table [{self.prefix}{key}] is missing")
        return _Reader(self.table[key], f"{self.prefix}{key}.", self.where)

    def string(self, key: str, choices: tuple[str, ...] = (), default: str | None = None) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self._fail(key, f"must be a string, got {value!r}")
        if choices and value not in choices:
            raise self._fail(key, f"must be one of {', '.join(choices)}, got '{value}'")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        value = self._get(key, None)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._fail(key, f"must be a list of strings, got {value!r}")
        return tuple(value)

    def integer(self, key: str, minimum: int) -> int:
        value = self._get(key, None)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, f"must be an integer, got {value!r}")
        if value < minimum:
            raise self._fail(key, f"must be >= {minimum}, got {value}")
        return value

    def number(self, key: str, low: float, high: float | None = None) -> float:
        value = self._get(key, None)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(key, f"must be a number, got {value!r}")
        if value < low or (high is not None and value > high):
            bound = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
            raise self._fail(key, f"must be {bound}, got {value:g}")
        return float(value)


def profile_from_dict(raw: dict[str, Any], source: str = "<profile>") -> DeviceProfile:
    """Validate a parsed profile (a TOML file's content, or a bundle manifest's copy)."""
    where = Path(source).name if source.endswith(".toml") else source
    top = _Reader(raw, "", where)
    runtime = top.table_of("runtime")
    training = top.table_of("training")
    parity = top.table_of("parity")
    budget = top.table_of("budget")
    backend = runtime.string("backend", BACKENDS)
    profile = DeviceProfile(
        name=top.string("name"),
        description=top.string("description"),
        backend=backend,
        execution_providers=runtime.strings("execution_providers"),
        device=runtime.string("device", DEVICES),
        precision=runtime.string("precision", PRECISIONS),
        quantization=runtime.string("quantization"),
        threads=runtime.integer("threads", 1),
        training_mode=training.string("mode", TRAINING_MODES),
        training_batch_size=training.integer("batch_size", 1),
        parity=ParityThresholds(
            max_abs_logit_diff_fp32=parity.number("max_abs_logit_diff_fp32", 0.0),
            max_top1_disagreement=parity.number("max_top1_disagreement", 0.0, 1.0),
            max_accuracy_drop=parity.number("max_accuracy_drop", 0.0, 1.0),
        ),
        budget=Budget(
            max_model_bytes=budget.integer("max_model_bytes", 1),
            max_memory_mb=budget.number("max_memory_mb", 0.0),
        ),
        fallback_precision=runtime.string("fallback_precision", ("", *PRECISIONS), default=""),
        alternative=runtime.string("alternative", ("", *BACKENDS), default=""),
        source=source,
    )
    for reader in (top, runtime, training, parity, budget):
        reader.unknown()
    if backend == "onnxruntime" and not profile.execution_providers:
        raise ProfileError(f"{where}: runtime.execution_providers must name at least one provider")
    if profile.device == "cuda" and backend == "litert":
        raise ProfileError(f"{where}: runtime.device 'cuda' does not apply to backend 'litert'")
    return profile
