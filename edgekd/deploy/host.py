"""Where an INT8 result was measured: the CPU, the ISA features onnxruntime's INT8
kernels dispatch on, and the onnxruntime version.

onnxruntime's CPU INT8 GEMM/conv kernels (MLAS) take different instructions on
different CPUs, and they are not equally exact:

* x86 with AVX-512 VNNI or AVX-VNNI: ``vpdpbusd`` multiplies u8 by s8 and accumulates
  in int32, exact for any 8-bit weights;
* x86 with AVX2 (or AVX-512BW) but no VNNI: ``vpmaddubsw`` adds *pairs* of u8·s8
  products into a saturating int16 before widening, so two full-range products
  (255·127 + 255·127 = 64 770 > 32 767) clip;
* aarch64 with the dot-product extension (``asimddp``) or ``i8mm``: ``sdot``/``udot``/
  ``smmla`` accumulate in int32, exact.

A parity number is therefore a property of a host, and bundles and fidelity reports
carry this description of theirs (`int8_host`). numpy only, so a device without torch
describes itself too.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

__all__ = ["describe_host", "int8_host", "int8_kernel"]

# numpy's CPUID-based runtime dispatch names -> the names /proc/cpuinfo uses. CPUID is
# asked, not /proc/cpuinfo, because an emulator (qemu-user) passes the host's cpuinfo
# through while emulating a smaller CPU; onnxruntime sees what CPUID says.
_NUMPY_FEATURES = {
    "AVX2": "avx2",
    "AVX512F": "avx512f",
    "AVX512BW": "avx512bw",
    "AVX512VNNI": "avx512_vnni",
    "ASIMDDP": "asimddp",
}
# Only in /proc/cpuinfo: numpy does not track these.
_CPUINFO_FEATURES = ("avx_vnni", "i8mm")


def _cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags from /proc/cpuinfo (Linux, Android)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    model, flags = "", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def _numpy_features() -> dict[str, bool]:
    try:  # a private table, but the one numpy's own show_runtime() prints
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        return {}
    return dict(__cpu_features__)


def int8_kernel(machine: str, isa: list[str]) -> str:
    """Which INT8 multiply-accumulate onnxruntime's MLAS kernels use with these
    features, and whether it can saturate (module docstring)."""
    features = set(isa)
    if machine.lower() in ("x86_64", "amd64", "i686", "x86"):
        if features & {"avx512_vnni", "avx_vnni"}:
            return "vpdpbusd u8*s8 -> int32 (VNNI, exact)"
        if features & {"avx2", "avx512bw"}:
            return "vpmaddubsw u8*s8 pairs -> saturating int16 (no VNNI)"
        return "sse u8*s8 -> int32"
    if machine.lower() in ("aarch64", "arm64"):
        if "i8mm" in features:
            return "smmla/ummla -> int32 (i8mm, exact)"
        if "asimddp" in features:
            return "sdot/udot -> int32 (dotprod, exact)"
        return "neon widening multiply -> int32"
    return "unknown"


def _cpuinfo_is_ours(flags: set[str], features: dict[str, bool]) -> bool:
    """Whether /proc/cpuinfo describes the CPU that runs us: under an emulator (qemu-user)
    it is the host's, and it lists a feature CPUID (numpy's dispatch table) denies, such
    as AVX-512 on an emulated AVX2 CPU. Then its own flags (``avx_vnni``) are not ours."""
    return not any(
        name in flags and key in features and not features[key]
        for key, name in _NUMPY_FEATURES.items()
    )


def int8_host() -> dict[str, Any]:
    """This host as INT8 parity depends on it: ``{"machine", "cpu", "isa", "int8_kernel",
    "onnxruntime"}`` (``onnxruntime`` is None where it is not installed)."""
    model, flags = _cpuinfo()
    features = _numpy_features()
    isa = sorted(
        {name for key, name in _NUMPY_FEATURES.items() if features.get(key)}
        | {
            name
            for name in _CPUINFO_FEATURES
            if name in flags and _cpuinfo_is_ours(flags, features)
        }
    )
    try:
        import onnxruntime

        ort_version: str | None = onnxruntime.__version__
    except ImportError:
        ort_version = None
    machine = platform.machine()
    return {
        "machine": machine,
        "cpu": model or platform.processor() or "unknown",
        "isa": isa,
        "int8_kernel": int8_kernel(machine, isa),
        "onnxruntime": ort_version,
    }


def describe_host(host: dict[str, Any]) -> str:
    """One line: ``AMD EPYC (x86_64; avx2 avx512_vnni; onnxruntime 1.32.0: vpdpbusd ...)``."""
    isa = " ".join(host.get("isa") or []) or "no INT8 ISA extensions"
    ort = host.get("onnxruntime") or "not installed"
    return (
        f"{host.get('cpu', 'unknown')} ({host.get('machine', '?')}; {isa}; "
        f"onnxruntime {ort}: {host.get('int8_kernel', 'unknown')})"
    )
