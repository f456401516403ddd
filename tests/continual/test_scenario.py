"""The streams of a continual run from its config, the proxy hash, and the two plots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekd.continual.scenario import client_stream, proxy_digest, server_stream
from edgekd.core.config import EdgeKDConfig
from edgekd.reporting.continual_plots import plot_accuracy_matrix, plot_task_accuracy


def _cfg(scenario: str) -> EdgeKDConfig:
    return EdgeKDConfig().with_overrides(
        {"continual.scenario": scenario, "continual.tasks": 2, "continual.samples-per-task": 150}
    )


@pytest.mark.parametrize("scenario", ["class-incremental", "domain-incremental"])
def test_server_draw_is_disjoint_from_the_clients_and_covers_every_task(scenario: str) -> None:
    # Execute
    cfg = _cfg(scenario)
    clients, server = client_stream(cfg), server_stream(cfg)

    # Assert: same tasks and sizes, another draw, rebuilt identically from the config.
    assert len(clients) == len(server) == 2
    for c, s in zip(clients, server, strict=True):
        assert c.classes == s.classes
        assert len(c.y_train) + len(c.y_test) == pytest.approx(150, abs=40)
        assert not np.array_equal(c.x_train[:5], s.x_train[:5])
    again = client_stream(EdgeKDConfig().with_overrides(cfg.to_flat()))
    np.testing.assert_array_equal(again[1].x_train, clients[1].x_train)
    with pytest.raises(ValueError, match="not a continual run"):
        client_stream(EdgeKDConfig())


def test_proxy_digest_changes_with_the_content() -> None:
    x = np.zeros((4, 1, 3), dtype=np.float32)
    p = np.full((4, 10), 0.1, dtype=np.float32)
    assert proxy_digest(x, p) == proxy_digest(x.copy(), p.copy())
    p2 = p.copy()
    p2[0, 0] = 0.2
    assert proxy_digest(x, p2) != proxy_digest(x, p)


def test_plots_are_written(tmp_path: Path) -> None:
    plot_accuracy_matrix([[0.9, 0.1], [0.5, 0.8]], tmp_path / "m.png")
    plot_task_accuracy({0: [0.1, 0.0], 1: [0.8, 0.0], 2: [0.4, 0.9]}, 1, tmp_path / "a.png")
    assert (tmp_path / "m.png").stat().st_size > 1000
    assert (tmp_path / "a.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="square"):
        plot_accuracy_matrix([[0.9, 0.1]], tmp_path / "bad.png")


def test_new_continual_modules_never_import_flwr() -> None:
    code = (
        "import sys, edgekd.continual.scenario, edgekd.reporting.continual_plots;"
        "bad = [m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
