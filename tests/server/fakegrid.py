"""A fake Grid for strategy tests (no Ray): every message is answered at once."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

Reply = Callable[[int, Message], RecordDict | None]


def node_contexts(nodes: list[int], partition_key: str, count_key: str) -> dict[int, Context]:
    """One Context per node, node i holding partition i of len(nodes); kept by the
    caller across rounds, as the simulation engine keeps ``context.state``."""
    return {
        node: Context(
            run_id=1,
            node_id=node,
            node_config={partition_key: i, count_key: len(nodes)},
            state=RecordDict(),
            run_config={},
        )
        for i, node in enumerate(nodes)
    }


class FakeGrid(Grid):
    """Answers every message with ``reply(node, msg)``; None becomes an error reply."""

    def __init__(self, nodes: list[int], reply: Reply) -> None:
        self.nodes, self.reply, self.sent = nodes, reply, []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        out = []
        for msg in messages:
            # As Flower's grids do when they push a message (a reply names it)
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"
            self.sent.append(msg)
            content = self.reply(msg.metadata.dst_node_id, msg)
            if content is None:
                out.append(Message(Error(code=0, reason="client crashed"), reply_to=msg))
            else:
                out.append(Message(content, reply_to=msg))
        return out

    # The strategy never calls these.
    def set_run(self, run):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        raise NotImplementedError
