"""Fixtures for the strategy tests (the fake Grid itself is in fakegrid.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages read the run's identity from process state that a ServerApp sets."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
