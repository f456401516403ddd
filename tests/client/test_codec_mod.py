"""The ClientApp's payload codec mod and the masked / QAT local update."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from edgekd.client.codec_mod import masks_from_message, payload_codec_mod
from edgekd.core import records as R
from edgekd.wire.codec import decode_delta, encode_state, shapes_manifest
from edgekd.wire.payload import PayloadError, record_to_state, state_to_record

STATE = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}
MASKS = {"w": np.abs(STATE["w"]) > 0.4}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _message(*, send_masks: bool, upload: str = "int8-delta-ef") -> Message:
    config = ConfigRecord(
        {
            R.SHAPES: shapes_manifest(STATE),
            R.UPLOAD: upload,
            R.MASK_VERSION: "v1",
        }
    )
    record = encode_state(STATE, masks=MASKS, int8=True, send_masks=send_masks)
    return Message(
        RecordDict({R.ARRAYS: record, R.CONFIG: config}), dst_node_id=1, message_type="train"
    )


def _handler(seen: list[dict[str, np.ndarray]]):  # type: ignore[no-untyped-def]
    def call_next(msg: Message, _ctx: Context) -> Message:
        seen.append(masks_from_message(msg.content))
        state = record_to_state(msg.content[R.ARRAYS])
        new = {k: v + 0.01 for k, v in state.items()}  # also moves pruned entries
        content = RecordDict({R.ARRAYS: state_to_record(new), R.METRICS: MetricRecord({})})
        return Message(content, reply_to=msg)

    return call_next


def test_masks_are_cached_and_the_upload_is_a_masked_delta_with_feedback() -> None:
    # Prepare
    context = Context(1, 1, {}, RecordDict(), {})
    seen: list[dict[str, np.ndarray]] = []

    # Execute: round 1 brings the masks, round 2 relies on the cache
    first = payload_codec_mod(_message(send_masks=True), context, _handler(seen))
    second = payload_codec_mod(_message(send_masks=False), context, _handler(seen))

    # Assert
    assert all(np.array_equal(s["w"], MASKS["w"]) for s in seen)
    for reply in (first, second):
        record = reply.content[R.ARRAYS]
        assert record["w::values"].dtype == "int8"
        assert len(record["w::values"].data) == int(MASKS["w"].sum())  # kept entries only
    received, _ = __import__("edgekd.wire.codec", fromlist=["decode_state"]).decode_state(
        encode_state(STATE, masks=MASKS, int8=True), STATE
    )
    new = decode_delta(first.content[R.ARRAYS], received, masks=MASKS)
    assert np.all(new["w"][~MASKS["w"]] == 0.0)  # the pruned entries did not move
    assert "edgekd.residual" in context.state.array_records


def test_a_node_without_the_cached_masks_fails_clearly() -> None:
    context = Context(1, 1, {}, RecordDict(), {})
    with pytest.raises(PayloadError, match="does not hold version"):
        payload_codec_mod(_message(send_masks=False), context, _handler([]))
