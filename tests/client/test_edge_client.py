"""The device side of a bundle: local data files, and the torch trainer's CUDA/FP16 path
(skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd.client.edge_client import EdgeDataError, read_device_data


def test_device_data_is_split_into_train_and_a_validation_tail(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((50, 1, 40), dtype=np.float32)
    np.savez(tmp_path / "train.npz", x=x, y=np.arange(50) % 10)
    train, val = read_device_data(tmp_path, (1, 40), 10)
    assert (len(train), len(val)) == (45, 5)
    np.testing.assert_array_equal(val.x, x[45:])


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (None, "no local data"),
        ({"x": np.zeros((4, 1, 39), np.float32), "y": np.zeros(4)}, "expected x"),
        ({"x": np.zeros((4, 1, 40), np.float32), "y": np.full(4, 10)}, "labels must be"),
        ({"x": np.zeros((4, 1, 40), np.float32)}, "unreadable"),
    ],
)
def test_bad_device_data_is_named(tmp_path: Path, arrays: dict | None, message: str) -> None:
    if arrays is not None:
        np.savez(tmp_path / "train.npz", **arrays)
    with pytest.raises(EdgeDataError, match=message) as err:
        read_device_data(tmp_path, (1, 40), 10)
    assert "train.npz" in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a Jetson profile)")
def test_kd_train_on_cuda_with_fp16_autocast_learns_and_returns_to_the_host() -> None:
    from edgekd.learn.models import build_model, spec_for
    from edgekd.learn.training import KDSettings, kd_train

    torch.manual_seed(0)
    model = build_model(spec_for((1, 40), 10, 8))
    rng = np.random.default_rng(0)
    x = rng.random((256, 1, 40), dtype=np.float32)
    y = (x[:, 0, :10].argmax(1)).astype(np.int64)  # a learnable rule
    settings = KDSettings(epochs=1, lr=1e-2, batch_size=32, device="cuda", fp16=True)
    first = kd_train(model, x, y, None, settings, num_classes=10, seed=0)["loss"]
    later = kd_train(model, x, y, None, settings, num_classes=10, seed=1)["loss"]
    assert later < first
    assert next(model.parameters()).device.type == "cpu"


def _pi_bundle(root: Path, mode: str) -> Path:
    """A Raspberry Pi bundle of the trained width-8 fixture student (its INT8 model flips
    7.0 % of the 4 000 default test predictions, on every CPU: the profile here accepts
    10 %), training the whole student (``full``) or the head (``head-only``)."""
    import edgekd.deploy
    from edgekd.deploy.bundle import build_bundle

    shipped = Path(edgekd.deploy.__file__).parent / "profiles" / "raspberry-pi.toml"
    profile = root / "pi.toml"
    profile.write_text(
        shipped.read_text()
        .replace("max_top1_disagreement = 0.03", "max_top1_disagreement = 0.10")
        .replace('mode = "full"', f'mode = "{mode}"', 1)
    )
    student = Path(__file__).parents[1] / "data" / "student_w8_trained.pt"
    return build_bundle(student, str(profile), root / "bundle")


@pytest.fixture(scope="module")
def pi_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pi_bundle(tmp_path_factory.mktemp("pi"), "full")


@pytest.fixture(scope="module")
def pi_head_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pi_bundle(tmp_path_factory.mktemp("pi-head"), "head-only")


def _edge_message(soft_targets: str):  # type: ignore[no-untyped-def]
    """A training message as the strategy sends it (after the codec mod), its student and
    the teacher's ONNX bytes."""
    import lzma

    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from edgekd.core import records as R
    from edgekd.deploy.onnx_export import export_onnx_bytes, sha256_hex
    from edgekd.learn.models import build_model, load_checkpoint, spec_for
    from edgekd.wire.payload import state_to_record

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    model, _ = load_checkpoint(str(Path(__file__).parents[1] / "data" / "student_w8_trained.pt"))
    sent = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    teacher = export_onnx_bytes(build_model(spec_for((1, 40), 10, 8)), (1, 40))
    config = ConfigRecord(
        {R.TEMPERATURE: 4.0, R.ALPHA: 0.8, R.LOCAL_EPOCHS: 1, R.SEED: 1, R.ROUND: 1,
         R.BATCH_SIZE: 32, R.LR: 0.01, R.SOFT_TARGETS: soft_targets, R.REFERENCE_BATCH: 32,
         R.CLASS_WEIGHTING: True, R.MAX_CLASS_WEIGHT: 5.0, R.TEACHER_HASH: sha256_hex(teacher)}
    )  # fmt: skip
    content = {R.ARRAYS: state_to_record(sent), R.CONFIG: config}
    rng = np.random.default_rng(0)
    content[R.PROXY] = state_to_record(
        {R.PROXY_X: rng.random((64, 1, 40), dtype=np.float32),
         R.PROXY_LOGITS: rng.normal(size=(64, 10)).astype(np.float32)}
    )  # fmt: skip
    blob = np.frombuffer(lzma.compress(teacher), dtype=np.uint8)
    content[R.TEACHER] = ArrayRecord({R.TEACHER_ONNX: Array(blob)})
    return Message(RecordDict(content), dst_node_id=1, message_type="train"), sent


def test_an_edge_node_couples_its_temperature_and_seed_like_a_torch_node(
    pi_bundle: Path, small_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch 8 on a node whose reference is 32 trains at T(8), with the seed of its
    partition: the same `RoundSettings` a torch node decodes."""
    from flwr.app import Context, RecordDict

    import edgekd.client.edge_client as edge
    import edgekd.client.graph_trainer as graph
    from edgekd.core import records as R
    from edgekd.core.round_settings import round_seed, temperature_for_batch

    # Prepare: record what the step loop is given.
    calls: list[tuple[float, int, int]] = []
    real = graph.local_full_kd

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((kwargs["temperature"], kwargs["batch_size"], kwargs["seed"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(graph, "local_full_kd", spy)
    msg, _ = _edge_message("on-device")

    # Execute: partitions 1 and 2, the first with its own batch of 8.
    replies = {}
    for pid, node in ((1, {R.NODE_BATCH_SIZE: 8}), (2, {})):
        node = {"bundle": str(pi_bundle), R.PARTITION_ID: pid, R.NUM_PARTITIONS: 4, **node}
        context = Context(
            run_id=1, node_id=pid, node_config=node, state=RecordDict(), run_config={}
        )
        replies[pid] = edge.handle_edge_train(small_config, msg, context)

    # Assert
    t8 = temperature_for_batch(4.0, 32, 8)
    assert calls == [(t8, 8, round_seed(1, 1, 1)), (4.0, 32, round_seed(1, 1, 2))]
    metrics = replies[1].content.metric_records[R.METRICS]
    assert metrics["temperature"] == pytest.approx(t8)


@pytest.mark.parametrize("soft_targets", ["proxy", "on-device"])
def test_an_edge_round_trains_every_tensor_of_the_student(
    pi_bundle: Path, small_config, soft_targets: str
) -> None:
    # Prepare: a training message as the server's strategy sends it (after the codec mod).
    from flwr.app import Context, RecordDict

    from edgekd.client.edge_client import handle_edge_evaluate, handle_edge_train
    from edgekd.core import records as R
    from edgekd.wire.payload import record_to_state, state_to_record

    msg, sent = _edge_message(soft_targets)
    node = {"bundle": str(pi_bundle), R.PARTITION_ID: 0, R.NUM_PARTITIONS: 4}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})

    # Execute
    reply = handle_edge_train(small_config, msg, context)
    got = record_to_state(reply.content.array_records[R.ARRAYS])
    msg.content.array_records[R.ARRAYS] = state_to_record(got)
    evaluated = handle_edge_evaluate(small_config, msg, context)

    # Assert: every tensor moved, and the node says which runtime trained it
    assert got.keys() == sent.keys()
    for name in sent:
        assert np.abs(got[name] - sent[name]).max() > 1e-5, name
    metrics = reply.content.metric_records[R.METRICS]
    assert metrics[R.NUM_EXAMPLES] > 0 and np.isfinite(metrics[R.TRAIN_LOSS])
    assert metrics[R.BACKEND_METRICS["onnxruntime"]] == 1
    accuracy = evaluated.content.metric_records[R.METRICS][R.ACCURACY]
    assert 0.2 < accuracy <= 1.0  # a trained student on its own validation share


@pytest.mark.parametrize("soft_targets", ["proxy", "on-device"])
def test_a_head_only_edge_round_trains_the_head_and_returns_the_rest_as_received(
    pi_head_bundle: Path, small_config, soft_targets: str
) -> None:
    # Prepare: a training message as the server's strategy sends it (after the codec mod).
    from flwr.app import Context, RecordDict

    from edgekd.client.edge_client import handle_edge_train
    from edgekd.core import records as R
    from edgekd.wire.payload import record_to_state

    msg, sent = _edge_message(soft_targets)
    node = {"bundle": str(pi_head_bundle), R.PARTITION_ID: 0, R.NUM_PARTITIONS: 4}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})

    # Execute
    reply = handle_edge_train(small_config, msg, context)

    # Assert
    got = record_to_state(reply.content.array_records[R.ARRAYS])
    assert got.keys() == sent.keys()
    for name in sent:
        if name.startswith("head."):
            assert np.abs(got[name] - sent[name]).max() > 1e-4, name
        else:
            np.testing.assert_array_equal(got[name], sent[name], err_msg=name)
    metrics = reply.content.metric_records[R.METRICS]
    assert metrics[R.NUM_EXAMPLES] > 0 and np.isfinite(metrics[R.TRAIN_LOSS])
