"""Fixtures for the strategy tests (the fake Grid itself is in fakegrid.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages read the run's identity from process state that a ServerApp sets."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Fake-Grid nodes run in this process and set torch to one thread on their first
    round. The server's teacher must train under the same thread count in every run of a
    test, or its float sums (and so the bit-identity of resumed runs) depend on which
    test ran first in the process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
