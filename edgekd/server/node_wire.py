"""The server's side of the wire format: what it sent each round and what each node
holds.

`NodeWire` is the one home of the per-node caches that let the strategy send less:
which nodes already hold the teacher and which mask version, the INT8 states kept as
bases for downlink deltas, which one each node confirmed and which it was just sent,
and, per round, the student as nodes decoded it (the base their replies are decoded
against). `edgekd.server.strategy` calls it from its ``configure_*`` and
``aggregate_*`` hooks; the codec itself is `edgekd.wire.codec`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from edgekd.core import records as R
from edgekd.server.ledger import RoundLedger
from edgekd.wire.codec import (
    MASK_SUFFIX,
    Held,
    decode_delta,
    decode_state,
    encode_state,
    encode_state_delta,
    held_codes,
    inflate_limit,
    is_encoded,
    is_packed,
    pack_record,
    shapes_manifest,
    unpack_record,
)
from edgekd.wire.payload import (
    PayloadError,
    check_update,
    record_nbytes,
    record_to_state,
    state_to_record,
)

Masks = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class WireFormat:
    """How the student travels: INT8 values (per-channel scales) or FP32 down, as a
    whole state or (``download = "delta"``, INT8 only) as the change of its codes
    against the state the node holds; ``upload`` (fp32 | int8-delta[-ef] |
    int4-delta[-ef]) up; ``entropy`` ("zlib": every payload deflated, both ways);
    ``quantizer_for`` names the QAT quantizer clients train with in a round ("" for
    none)."""

    int8: bool = False
    upload: str = "fp32"
    download: str = "state"
    entropy: str = "none"
    quantizer_for: Callable[[int], str] = field(default=lambda _round: "")

    @property
    def state_deltas(self) -> bool:
        return self.int8 and self.download == "delta"


HELD_VERSIONS = 4  # INT8 states the server keeps codes of, as bases for deltas


@dataclass
class RoundWire:
    """What the server sent in one round, the base for decoding its replies."""

    sent: dict[str, np.ndarray]  # the student as nodes decode it (after INT8 rounding)
    masks: dict[str, np.ndarray]
    version: str  # hash of the masks; "" when nothing is pruned
    master: dict[str, np.ndarray] | None = None  # the FP32 global before INT8 rounding


def masks_version(masks: Masks) -> str:
    """A short content hash of the masks, so nodes can cache them between rounds."""
    if not masks:
        return ""
    digest = hashlib.sha256()
    for name in sorted(masks):
        digest.update(name.encode())
        digest.update(np.packbits(np.asarray(masks[name], dtype=bool).ravel()).tobytes())
    return digest.hexdigest()[:16]


class NodeWire:
    """Per-round and per-node wire state of one strategy (see the module docstring)."""

    def __init__(
        self,
        wire: WireFormat,
        *,
        teacher_record: ArrayRecord | None,
        proxy_record: ArrayRecord | None,
        arrayrecord_key: str,
        configrecord_key: str,
    ) -> None:
        self.wire = wire
        self.teacher_record = teacher_record
        self.proxy_record = proxy_record
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self._nodes_with_teacher: set[int] = set()
        self._node_masks: dict[int, str] = {}  # node -> mask version it holds
        self._rounds: dict[int, RoundWire] = {}
        # Downlink deltas: the codes of the last INT8 states sent, which one each node
        # confirmed (by replying) it holds, and which one it was just sent.
        self._held: dict[str, Held] = {}
        self._node_state: dict[int, str] = {}
        self._awaiting: dict[int, str] = {}

    def open_round(self, server_round: int, state: Masks, masks: dict[str, np.ndarray]) -> None:
        """Remember what nodes will decode in ``server_round`` (after INT8 rounding)."""
        sent, _ = decode_state(encode_state(state, masks=masks, int8=self.wire.int8), state)
        self._rounds[server_round] = RoundWire(
            dict(sent), masks, masks_version(masks), dict(state) if self.wire.int8 else None
        )

    def round_wire(self, server_round: int) -> RoundWire | None:
        return self._rounds.get(server_round)

    def masks_for_round(self, server_round: int) -> dict[str, np.ndarray]:
        """The pruning masks the nodes trained under in ``server_round`` (empty: none)."""
        wire = self._rounds.get(server_round)
        return dict(wire.masks) if wire is not None else {}

    def replied(self, node: int, wire: RoundWire | None, *, trained: bool) -> None:
        """A valid reply from ``node``: it holds the round's masks (and, after training,
        the teacher)."""
        if trained:
            self._nodes_with_teacher.add(node)
        if wire is not None and wire.version:
            self._node_masks[node] = wire.version

    def failed(self, node: int) -> None:
        """A failed reply: ``node`` may have lost its cache."""
        self._node_masks.pop(node, None)

    def config_with_keys(
        self, config: ConfigRecord, server_round: int, state: Masks, masks: Masks
    ) -> ConfigRecord:
        return ConfigRecord(
            {
                **dict(config.items()),
                R.SHAPES: shapes_manifest(state),
                R.UPLOAD: self.wire.upload,
                R.ENTROPY: self.wire.entropy,
                R.QAT: self.wire.quantizer_for(server_round),
                R.MASK_VERSION: masks_version(masks),
            }
        )

    def encode(
        self,
        messages: list[Message],
        state: Masks,
        masks: Masks,
        ledger: RoundLedger,
        *,
        attach_sources: bool,
    ) -> list[Message]:
        """Each message with its own content: the encoded student (masks only for nodes
        that do not hold this version yet) and, for training, the soft-target source."""
        version = masks_version(masks)
        with_masks = encode_state(state, masks=masks, int8=self.wire.int8)
        without = encode_state(state, masks=masks, int8=self.wire.int8, send_masks=False)
        state_id = self._remember_state(with_masks, state, masks)
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            content = dict(msg.content.items())
            cached = bool(masks) and self._node_masks.get(node) == version
            record = without if cached else with_masks
            if state_id:
                record, base_id = self._state_delta(node, record, state, masks, cached)
                config = msg.content.config_records.get(self.configrecord_key, ConfigRecord())
                content[self.configrecord_key] = ConfigRecord(
                    {**dict(config.items()), R.STATE_VERSION: state_id, R.BASE_VERSION: base_id}
                )
                self._awaiting[node] = state_id
            if self.wire.entropy == "zlib":
                record = pack_record(record)
            content[self.arrayrecord_key] = record
            if attach_sources and self.teacher_record is not None:
                if node not in self._nodes_with_teacher:
                    content[R.TEACHER] = self.teacher_record
            if attach_sources and self.proxy_record is not None:
                content[R.PROXY] = self.proxy_record
            msg = Message(
                content=RecordDict(content),
                dst_node_id=node,
                message_type=msg.metadata.message_type,
            )
            ledger.bytes_down += sum(record_nbytes(r) for r in msg.content.array_records.values())
            out.append(msg)
        return out

    def _remember_state(self, full: ArrayRecord, state: Masks, masks: Masks) -> str:
        """With downlink deltas: the id of this INT8 state (a hash of its encoding),
        keeping its codes as a base for later deltas; "" otherwise."""
        if not self.wire.state_deltas:
            return ""
        digest = hashlib.sha256()
        for key, arr in full.items():
            digest.update(key.encode())
            digest.update(bytes(arr.data))
        state_id = digest.hexdigest()[:16]
        if state_id not in self._held:
            self._held[state_id] = held_codes(state, masks)
            while len(self._held) > HELD_VERSIONS:
                self._held.pop(next(iter(self._held)))
        return state_id

    def _state_delta(
        self, node: int, full: ArrayRecord, state: Masks, masks: Masks, cached: bool
    ) -> tuple[ArrayRecord, str]:
        """``(record, base id)``: the change of the codes against the state ``node``
        holds, or ``(full, "")`` when the server does not know one it still keeps."""
        base_id = self._node_state.get(node, "")
        base = self._held.get(base_id)
        if base is None:
            return full, ""
        try:
            record, _ = encode_state_delta(state, base, masks=masks, send_masks=not cached)
        except ValueError:  # the student's arrays changed shape since: send it whole
            return full, ""
        return record, base_id

    def settle(self, replies: list[Message]) -> None:
        """A node that replied decoded what it was sent and now holds that state; one
        that failed or did not answer may hold anything, so it gets a whole state next."""
        for msg in replies:
            node = msg.metadata.src_node_id
            sent = self._awaiting.pop(node, None)
            if msg.has_error() or sent is None:
                self._node_state.pop(node, None)
            else:
                self._node_state[node] = sent
        for node in self._awaiting:
            self._node_state.pop(node, None)
        self._awaiting.clear()

    def decode_reply(self, record: ArrayRecord, wire: RoundWire) -> ArrayRecord:
        """A reply's student as plain FP32 arrays; `PayloadError` if it does not decode."""
        if is_packed(record):
            record = unpack_record(record, inflate_limit(wire.sent))
        if not is_encoded(record):  # plain Arrays (a node without the codec mod)
            check_update(record, wire.sent)
            state = record_to_state(record)
            for name, mask in wire.masks.items():  # it cannot un-prune a weight
                state[name] = np.where(mask, state[name], np.zeros_like(state[name]))
        elif self.wire.upload == "fp32":
            if any(key.endswith(MASK_SUFFIX) for key in record.keys()):
                # it could un-prune weights with a mask of its own
                raise PayloadError("a reply may not carry pruning masks: they are the server's")
            state, _ = decode_state(record, wire.sent, known_masks=wire.masks)
        else:
            state = decode_delta(record, wire.sent, masks=wire.masks)
        if wire.master is not None:
            # The server keeps FP32 master weights: a node's change is applied to them,
            # not to their INT8 rounding, or every update smaller than half a step
            # would be rounded away again next round and late training would stall.
            for name, value in state.items():
                if value.dtype.kind == "f":
                    state[name] = (wire.master[name] + (value - wire.sent[name])).astype(
                        value.dtype
                    )
        return state_to_record(state)
