"""The simulation engine's inbox poller: only nodes with pending messages are asked."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from queue import Queue
from types import SimpleNamespace
from typing import Any

from edgekd.cli.sim_poller import make_pending_poller, pending_inbox_poller, pending_nodes


def _msg(dst: int, delivered: str = "") -> Any:
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=dst, delivered_at=delivered))


@dataclass
class FakeLinkState:
    """The part of flwr's InMemoryLinkState the poller reads."""

    message_ins_store: dict[str, Any]
    lock: Any = field(default_factory=threading.RLock)
    asked: list[int] = field(default_factory=list)

    def get_message_ins(self, node_id: int, limit: int) -> list[Any]:
        self.asked.append(node_id)
        for msg in self.message_ins_store.values():
            if msg.metadata.dst_node_id == node_id and not msg.metadata.delivered_at:
                msg.metadata.delivered_at = "now"
                return [msg][:limit]
        return []


def _poll(state: Any, nodes: dict[int, int], original: Any = None, expect: int = 0) -> Queue[Any]:
    """Run the poller until ``expect`` messages are queued (10 s at most), then one more
    poll interval, so that a loaded host only makes it slower, not different."""
    queue: Queue[Any] = Queue()
    stop = threading.Event()
    poller = make_pending_poller(original or (lambda *a: None))
    thread = threading.Thread(target=poller, args=(state, queue, nodes, stop))
    thread.start()
    deadline = time.monotonic() + 10
    while queue.qsize() < expect and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.25)  # further polls find nothing left to deliver
    stop.set()
    thread.join(timeout=5)
    return queue


def test_only_nodes_with_undelivered_messages_are_asked_in_node_order() -> None:
    store = {"a": _msg(7), "b": _msg(3), "c": _msg(5, delivered="earlier"), "d": _msg(7)}
    state = FakeLinkState(store)
    nodes = {n: n for n in range(10_000)}

    queue = _poll(state, nodes, expect=3)

    # Flower's poller would ask all 10 000 nodes every poll; node 7's second message
    # goes out on the next poll, as with Flower's limit=1.
    assert state.asked[:2] == [3, 7] and state.asked[2:3] == [7]
    assert sorted(state.asked) == [3, 7, 7]
    assert queue.qsize() == 3


def test_pending_nodes_ignores_delivered_messages() -> None:
    store = {"a": _msg(1), "b": _msg(2, delivered="t"), "c": _msg(1)}
    assert pending_nodes(store) == {1}


def test_another_link_state_gets_flowers_poller() -> None:
    called: list[Any] = []

    _poll(SimpleNamespace(), {1: 1}, original=lambda *args: called.append(args))

    assert len(called) == 1


def test_flowers_poller_is_restored_after_the_simulation() -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    with pending_inbox_poller():
        assert vce_api.add_messages_to_queue is not original
    assert vce_api.add_messages_to_queue is original
