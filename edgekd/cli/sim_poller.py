"""An inbox poller for Flower's simulation engine that scales to fleets of thousands.

flwr 1.42's Simulation Engine moves instructions from its LinkState to the Ray
workers in ``vce_api.add_messages_to_queue``: every 0.1 s it asks the LinkState for
each simulated node's next message, and each ask scans every stored message
(``InMemoryLinkState.get_message_ins``, with an expiry and federation check per
message). With N nodes and M stored messages that is N·M checks ten times a second,
pending or not: at 10 000 nodes and 50 sampled per round it kept about one of this
host's two cores busy and nearly doubled the seconds per round (docs/scale.md).

`pending_inbox_poller` swaps in a poller that makes the same ``get_message_ins`` calls,
in the same node order, for the nodes that have an undelivered message only, and puts
Flower's back afterwards. It engages on the LinkState it was written against (one with
a ``message_ins_store`` dict of Flower `Message`s); with any other it runs Flower's.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from queue import Queue
from typing import Any


def pending_nodes(store: Mapping[str, Any], lock: Any = None) -> set[int]:
    """The destination node of every message in ``store`` not yet delivered."""
    with lock if lock is not None else contextlib.nullcontext():
        messages = list(store.values())
    return {m.metadata.dst_node_id for m in messages if not m.metadata.delivered_at}


def make_pending_poller(original: Callable[..., None]) -> Callable[..., None]:
    """Flower's ``add_messages_to_queue``, asking only the nodes with pending messages."""

    def add_pending_messages_to_queue(
        state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, int], f_stop: threading.Event
    ) -> None:
        store = getattr(state, "message_ins_store", None)
        if not isinstance(store, dict):  # another LinkState: Flower's own poller
            original(state, queue, nodes_mapping, f_stop)
            return
        lock = getattr(state, "lock", None)
        while not f_stop.is_set():
            pending = pending_nodes(store, lock)
            for node_id in [n for n in nodes_mapping if n in pending] if pending else []:
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(0.1)

    return add_pending_messages_to_queue


@contextlib.contextmanager
def pending_inbox_poller() -> Iterator[None]:
    """Run Flower's simulation engine with `make_pending_poller`'s poller inside."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = make_pending_poller(original)
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original
