"""The fleet runner (`edgekd.server.fleet_run`) on a fake Grid whose nodes run the real
ClientApp: the class query, a student per class, the FedDF step, the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fakegrid import FakeGrid, node_contexts  # tests/server/fakegrid.py
from flwr.app import ConfigRecord, Message, RecordDict
from torch import nn

from edgekd.client.app import make_client_app
from edgekd.core import records as R
from edgekd.core.config import EdgeKDConfig
from edgekd.core.fleet import parse_fleet_classes
from edgekd.core.numerics import softmax
from edgekd.learn.models import load_checkpoint
from edgekd.server.fleet_run import (
    ClassRun,
    FleetError,
    ask_classes,
    class_grid,
    ensemble_members,
    ensemble_targets,
    route_replies,
    run_fleet,
)

NODES = [101, 102, 103, 104]


def tiny(tmp_path: Path, **extra: object) -> EdgeKDConfig:
    return EdgeKDConfig().with_overrides(
        {
            "fleet.classes": "pi:0.5,jetson:0.5",
            "data.num-samples": 2000,
            "model.teacher-epochs": 5,
            "train.warm-start-epochs": 2,
            "train.local-epochs": 1,
            "train.num-rounds": 2,
            "train.round-timeout": 5,
            "out-dir": str(tmp_path / "run"),
            "seed": 3,
            **extra,
        }
    )


class AppGrid(FakeGrid):
    """Four simulated nodes, each running the real ClientApp with its own Context."""

    def __init__(self, cfg: EdgeKDConfig) -> None:
        self.app = make_client_app(cfg)
        self.contexts = node_contexts(NODES, R.PARTITION_ID, R.NUM_PARTITIONS)
        super().__init__(NODES, self.answer)

    def answer(self, node: int, msg: Message) -> RecordDict | None:
        try:
            return self.app(msg, self.contexts[node]).content
        except Exception:  # noqa: BLE001 - the engine turns it into an error reply
            return None


def test_a_fleet_run_trains_one_student_per_class_and_reports_each(tmp_path: Path) -> None:
    # Prepare
    cfg = tiny(tmp_path, **{"fleet.ensemble": "larger"})
    grid = AppGrid(cfg)

    # Execute
    out = run_fleet(grid, cfg, show_progress=False)

    # Assert: each node was asked its class and then sent its class's width only.
    report = json.loads((out / "report.json").read_text())
    classes = report["fleet"]["classes"]
    assert [(n, c["width"], c["nodes"]) for n, c in classes.items()] == [
        ("pi", 16, 2),
        ("jetson", 32, 2),
    ]
    widths = {101: 16, 102: 16, 103: 32, 104: 32}  # partitions 0, 1 are pi; 2, 3 jetson
    trained = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(trained) == 2 * 4 * 2  # two runs (fleet, own class) x 4 nodes x 2 rounds
    for msg in trained:
        width = msg.content.config_records[R.CONFIG][R.STUDENT_WIDTH]
        assert width == widths[msg.metadata.dst_node_id]
    for name, block in classes.items():
        assert block["params"] == {"pi": 3274, "jetson": 9610}[name]
        assert [r["round"] for r in block["rounds"]] == [0, 1, 2]
        assert sum(r["replies"] for r in block["rounds"][1:]) == 4  # 2 nodes x 2 rounds
        assert sum(r["rejected"] + r["failures"] for r in block["rounds"][1:]) == 0
        assert block["bytes_up"] > 0 and block["bytes_down"] > block["bytes_up"]
        assert block["gain_over_own_class"] == pytest.approx(
            block["accuracy"] - block["own_class"]["accuracy"]
        )
        assert 0.0 <= block["val_accuracy"] <= 1.0 and "agreement" in block
        model, spec = load_checkpoint(str(out / "students" / f"{name}.pt"))
        assert spec.width == block["width"]
    # The wider class sends more bytes (twice the channels, 2.9x the parameters).
    assert classes["jetson"]["bytes_up"] > 2.5 * classes["pi"]["bytes_up"]
    # The two runs start from the same warm students and differ only in the server step:
    # with fleet.ensemble = larger the widest class distils from the teacher alone in both,
    # so its two runs are the same run; the small class learns from the wide one too.
    for block in classes.values():
        assert block["rounds"][0]["accuracy"] == block["own_class"]["rounds"][0]["accuracy"]
    jetson, pi = classes["jetson"], classes["pi"]
    assert [r["accuracy"] for r in jetson["rounds"]] == [
        r["accuracy"] for r in jetson["own_class"]["rounds"]
    ]
    # (nll, not accuracy: two different small models can tie on 400 test samples)
    assert pi["nll"] != pytest.approx(pi["own_class"]["nll"], rel=1e-6, abs=0)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("larger", {"pi": ["phone", "jetson"], "phone": ["jetson"], "jetson": []}),
     ("all", {c: ["pi", "phone", "jetson"] for c in ("pi", "phone", "jetson")})],
)  # fmt: skip
def test_each_class_distils_from_the_members_its_mode_names(
    mode: str, expected: dict[str, list[str]]
) -> None:
    runs = [
        ClassRun(device, EdgeKDConfig(), None, [], None)  # type: ignore[arg-type]
        for device in parse_fleet_classes("pi=8:0.3,phone:0.3,jetson:0.4")
    ]
    students = [nn.Linear(1, 1) for _ in runs]
    name_of = {id(s): r.device.name for r, s in zip(runs, students, strict=True)}
    for run in runs:
        members = ensemble_members(runs, students, run, mode)
        assert [name_of[id(m)] for m in members] == expected[run.device.name]


def test_a_student_over_its_profiles_budget_is_refused_before_training(tmp_path: Path) -> None:
    # Width 256 is 420 874 parameters, 1.7 MB in FP32: over the Pi's 1 MB.
    cfg = tiny(tmp_path, **{"fleet.classes": "pi=256:0.5,jetson:0.5"})
    with pytest.raises(FleetError, match=r"class pi's student \(width 256.*raspberry-pi"):
        run_fleet(AppGrid(cfg), cfg, show_progress=False)


def test_nodes_that_fail_or_name_no_class_of_the_fleet_are_left_out() -> None:
    classes = parse_fleet_classes("pi:0.5,jetson:0.5")
    answers = {1: "pi", 2: "jetson", 3: "toaster", 4: None, 5: "jetson"}

    def reply(node: int, msg: Message) -> RecordDict | None:
        name = answers[node]
        return None if name is None else RecordDict({R.CONFIG: ConfigRecord({R.FLEET_CLASS: name})})

    members = ask_classes(FakeGrid(list(answers), reply), classes, min_nodes=1, timeout=1)
    assert members == {"pi": [1], "jetson": [2, 5]}

    answers = {1: "jetson", 2: "jetson"}
    with pytest.raises(FleetError, match="no node of class pi answered"):
        ask_classes(FakeGrid(list(answers), reply), classes, min_nodes=1, timeout=1)


def test_a_class_grid_shows_only_its_connected_nodes() -> None:
    grid = FakeGrid([1, 2, 3], lambda node, msg: RecordDict())
    assert list(class_grid(grid, [2, 3, 9]).get_node_ids()) == [2, 3]


def test_ensemble_targets_are_the_softmax_of_the_mean_logits() -> None:
    x = np.random.default_rng(0).normal(size=(5, 1, 3)).astype(np.float32)
    models = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        models.append(nn.Sequential(nn.Flatten(), nn.Linear(3, 4)))
    with torch.no_grad():
        logits = [m(torch.from_numpy(x)).numpy() for m in models]
    expected = softmax(np.mean(logits, axis=0) / 2.0)
    np.testing.assert_allclose(ensemble_targets(models, x, 2.0), expected, rtol=1e-5, atol=1e-7)


def test_with_every_class_in_the_ensemble_the_widest_class_learns_from_the_others_too(
    tmp_path: Path,
) -> None:
    cfg = tiny(tmp_path)  # fleet.ensemble = all, the default
    report = json.loads(
        (run_fleet(AppGrid(cfg), cfg, show_progress=False) / "report.json").read_text()
    )
    jetson = report["fleet"]["classes"]["jetson"]
    assert jetson["rounds"][0]["accuracy"] == jetson["own_class"]["rounds"][0]["accuracy"]
    assert jetson["nll"] != pytest.approx(jetson["own_class"]["nll"], rel=1e-6, abs=0)
    assert "every class's student, its own included" in report["fleet"]["step"]


@pytest.mark.parametrize(
    ("connects_on", "joins_at"),
    [("query", 1), ("train", 2)],  # while the students warm-start; during round 1
)
def test_a_node_that_connects_after_the_class_query_joins_its_class_from_that_round(
    tmp_path: Path, connects_on: str, joins_at: int
) -> None:
    # Prepare: five partitions; partition 4's node (a jetson) connects when node 101 first
    # answers a message of type ``connects_on``.
    cfg = tiny(tmp_path, **{"train.num-rounds": 3})
    app = make_client_app(cfg)
    contexts = node_contexts([*NODES, 105], R.PARTITION_ID, R.NUM_PARTITIONS)
    connected = list(NODES)
    trained: dict[int, int] = {}

    def answer(node: int, msg: Message) -> RecordDict | None:
        if msg.metadata.message_type == "train":
            trained[node] = trained.get(node, 0) + 1
        if node == 101 and msg.metadata.message_type == connects_on and 105 not in connected:
            connected.append(105)
        return app(msg, contexts[node]).content

    grid = FakeGrid(connected, answer)

    # Execute
    out = run_fleet(grid, cfg, show_progress=False)

    # Assert: 105 was asked its class once, trained from round ``joins_at`` in both passes,
    # and only with the jetson width; the others trained all 3 rounds of both passes.
    report = json.loads((out / "report.json").read_text())
    classes = report["fleet"]["classes"]
    assert classes["jetson"]["joined_late"] == {"105": joins_at}
    assert classes["pi"]["joined_late"] == {}
    assert (classes["pi"]["nodes"], classes["jetson"]["nodes"]) == (2, 3)
    queries = [m for m in grid.sent if m.metadata.message_type == "query"]
    assert sorted(m.metadata.dst_node_id for m in queries) == [101, 102, 103, 104, 105]
    assert trained[105] == 2 * (3 - joins_at + 1)
    assert all(trained[n] == 6 for n in NODES)
    to_105 = [
        m for m in grid.sent if m.metadata.dst_node_id == 105 and m.metadata.message_type == "train"
    ]
    assert {m.content.config_records[R.CONFIG][R.STUDENT_WIDTH] for m in to_105} == {32}
    for name in classes:
        assert [r["round"] for r in classes[name]["rounds"]] == [0, 1, 2, 3]


def test_with_profile_backends_the_pi_class_trains_through_onnxruntime_step_graphs(
    tmp_path: Path,
) -> None:
    # Prepare
    cfg = tiny(tmp_path, **{"fleet.backends": "profile"})
    on_torch = tiny(tmp_path, **{"out-dir": str(tmp_path / "torch")})

    # Execute
    out = run_fleet(AppGrid(cfg), cfg, show_progress=False)
    out_torch = run_fleet(AppGrid(on_torch), on_torch, show_progress=False)

    # Assert: every pi update of both passes came from onnxruntime, every jetson one from
    # torch, and none was refused.
    classes = json.loads((out / "report.json").read_text())["fleet"]["classes"]
    for name, runtime in (("pi", "onnxruntime"), ("jetson", "torch")):
        for rounds in (classes[name]["rounds"][1:], classes[name]["own_class"]["rounds"][1:]):
            assert [r[f"updates_{runtime}"] for r in rounds] == [2, 2]
            assert sum(r["rejected"] + r["failures"] for r in rounds) == 0
    # The step graph computes torch's update (tests/deploy/test_train_step.py); its batches
    # come in another order, so the pi student ends near, not at, the all-torch fleet's
    # (measured: NLL 1.812 against 1.821).
    torch_pi = json.loads((out_torch / "report.json").read_text())["fleet"]["classes"]["pi"]
    assert torch_pi["rounds"][-1]["updates_torch"] == 2
    assert classes["pi"]["nll"] != torch_pi["nll"]
    assert classes["pi"]["nll"] == pytest.approx(torch_pi["nll"], rel=0.02)


def test_narrower_nodes_get_the_widest_student_as_onnx_and_distil_toward_it(
    tmp_path: Path,
) -> None:
    # Prepare
    import lzma

    import onnxruntime as ort

    from edgekd.learn.models import load_for_state, spec_for
    from edgekd.learn.training import predict_logits
    from edgekd.wire.payload import record_to_state

    cfg = tiny(tmp_path, **{"fleet.peer-weight": 0.5, "fleet.peer-alpha": 0.3})
    grid = AppGrid(cfg)

    # Execute
    run_fleet(grid, cfg, show_progress=False)

    # Assert: in the fleet's pass (the first 8 train messages) the Pi nodes' carry the
    # Jetson class's student of that round, the weight and the peer's CE weight; the
    # Jetson nodes' carry none and kd.alpha, and so does the own-class comparator's pass
    # (a class alone has no peer).
    trained = [m for m in grid.sent if m.metadata.message_type == "train"]
    fleet, own = trained[:8], trained[8:]
    pis = [m for m in fleet if m.metadata.dst_node_id in (101, 102)]
    jetsons = [m for m in fleet if m.metadata.dst_node_id in (103, 104)]
    assert all(R.PEER in m.content.array_records for m in pis)
    assert all(m.content.config_records[R.CONFIG][R.PEER_WEIGHT] == 0.5 for m in pis)
    assert all(m.content.config_records[R.CONFIG][R.ALPHA] == 0.3 for m in pis)
    assert not any(R.PEER in m.content.array_records for m in jetsons + own)
    assert all(m.content.config_records[R.CONFIG][R.ALPHA] == 0.8 for m in jetsons + own)
    first_pi = next(m for m in pis if m.content.config_records[R.CONFIG][R.ROUND] == 1)
    first_jetson = next(m for m in jetsons if m.content.config_records[R.CONFIG][R.ROUND] == 1)
    onnx = lzma.decompress(first_pi.content[R.PEER][R.TEACHER_ONNX].numpy().tobytes())
    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(16, 1, 40)).astype(np.float32)
    state = record_to_state(first_jetson.content[R.ARRAYS])
    jetson = load_for_state(spec_for((1, 40), 10, 32), state)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], predict_logits(jetson, x), atol=1e-4)
    rounds = {int(m.content.config_records[R.CONFIG][R.ROUND]): m for m in pis}  # type: ignore[arg-type]
    assert (
        rounds[1].content[R.PEER][R.TEACHER_ONNX].numpy().tobytes()
        != rounds[2].content[R.PEER][R.TEACHER_ONNX].numpy().tobytes()
    )  # the Jetson student of round 2 is not that of round 1


def test_with_train_narrower_the_wider_nodes_train_the_narrow_student_in_the_fleet_pass_only(
    tmp_path: Path,
) -> None:
    # Prepare
    cfg = tiny(tmp_path, **{"fleet.train-narrower": True})
    grid = AppGrid(cfg)

    # Execute
    out = run_fleet(grid, cfg, show_progress=False)

    # Assert: in the fleet's pass (its first 2 x 6 train messages) the Jetson nodes get the
    # Pi student (width 16) besides their own, and the Pi nodes only theirs; in the
    # own-class pass every node gets its own class's student alone.
    trained = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(trained) == 2 * 6 + 2 * 4
    fleet, own = trained[:12], trained[12:]

    def widths(msgs: list[Message]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for m in msgs:
            width = int(m.content.config_records[R.CONFIG][R.STUDENT_WIDTH])  # type: ignore[arg-type]
            out.setdefault(m.metadata.dst_node_id, []).append(width)
        return {node: sorted(ws) for node, ws in sorted(out.items())}

    assert widths(fleet) == {
        101: [16, 16],
        102: [16, 16],
        103: [16, 16, 32, 32],
        104: [16, 16, 32, 32],
    }
    assert widths(own) == {101: [16, 16], 102: [16, 16], 103: [32, 32], 104: [32, 32]}
    # Each reply went to the class whose message it answers: the Pi student averaged
    # four updates a round in the fleet (none rejected for a wrong shape), two alone.
    pi = json.loads((out / "report.json").read_text())["fleet"]["classes"]["pi"]
    assert [r["replies"] for r in pi["rounds"][1:]] == [4, 4]
    assert [r["replies"] for r in pi["own_class"]["rounds"][1:]] == [2, 2]
    assert all(r["rejected"] + r["failures"] == 0 for r in pi["rounds"][1:])
    assert pi["nodes"] == 2  # the class's own nodes; the helpers are the Jetson's


def test_replies_go_to_the_class_whose_message_they_answer() -> None:
    sent: list[list[Message]] = [[], []]
    grid = FakeGrid([1, 2], lambda node, msg: RecordDict())
    for i, node in [(0, 1), (0, 2), (1, 2)]:  # node 2 gets a message of each class
        sent[i].append(Message(RecordDict(), dst_node_id=node, message_type="train"))
    replies = list(grid.send_and_receive([m for s in sent for m in s]))
    stray = Message(RecordDict(), dst_node_id=2, message_type="train")
    stray.metadata.__dict__["_message_id"] = "never-sent"
    replies.append(Message(RecordDict(), reply_to=stray))

    routed = route_replies(replies, sent)

    assert [[r.metadata.src_node_id for r in rs] for rs in routed] == [[1, 2], [2]]
    assert [r.metadata.reply_to_message_id for r in routed[1]] == [sent[1][0].metadata.message_id]
