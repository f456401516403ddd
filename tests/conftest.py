"""Shared fixtures: a private data cache and a small, fast run configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekd.core.config import EdgeKDConfig


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    import os

    os.environ.setdefault("EDGEKD_CACHE_DIR", str(tmp_path_factory.mktemp("edgekd-cache")))


@pytest.fixture
def small_config(tmp_path: Path) -> EdgeKDConfig:
    """mnist1d at 2 000 samples per domain, a few epochs: seconds, not minutes."""
    return EdgeKDConfig().with_overrides(
        {
            "data.num-samples": 2000,
            "model.teacher-epochs": 8,
            "model.teacher-width": 16,
            "model.student-width": 8,
            "train.num-rounds": 3,
            "train.local-epochs": 1,
            "train.warm-start-epochs": 2,
            "out-dir": str(tmp_path / "run"),
        }
    )
