"""Anti-forgetting regularizers: formulas, gradients, state round-trips and the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgekd.continual.regularizers import (
    EWC,
    REGULARIZERS,
    LwF,
    LwFProxy,
    NaiveFineTuning,
    Replay,
    ReplayProxy,
    TeacherKD,
    empirical_fisher,
    make_regularizer,
    tempered_kl,
)
from edgekd.continual.streams import Task
from edgekd.learn.kd import class_balanced_kd_loss
from edgekd.learn.models import build_model, spec_for

SPEC = spec_for((1, 40), 10, 4)


def _task(task_id: int, classes: tuple[int, ...], n: int = 24) -> Task:
    rng = np.random.default_rng(task_id)
    x = rng.normal(size=(n, 1, 40)).astype(np.float32)
    y = np.asarray(classes, dtype=np.int64)[np.arange(n) % len(classes)]
    return Task(task_id, f"t{task_id}", classes, x, y, x, y)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(SPEC)


# --- teacher KD --------------------------------------------------------------------------------
def test_teacher_kd_gradient_matches_closed_form() -> None:
    # Prepare: d/dz [w * tau^2 * mean_i KL(p_t || softmax(z / tau))] = w * tau * (p_s - p_t) / B.
    torch.manual_seed(0)
    tau, weight = 3.0, 0.7
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.softmax(torch.randn(5, 4, dtype=torch.float64) / tau, dim=1)
    reg = TeacherKD(weight=weight, temperature=tau)
    # Execute
    reg.penalty(torch.nn.Identity(), logits, logits, torch.zeros(5), teacher).backward()
    # Assert
    expected = weight * tau * (torch.softmax(logits.detach() / tau, dim=1) - teacher) / 5
    torch.testing.assert_close(logits.grad, expected)


def test_tempered_kl_matches_the_written_out_formula() -> None:
    torch.manual_seed(1)
    tau = 2.0
    z = torch.randn(3, 5, dtype=torch.float64)
    p_t = torch.softmax(torch.randn(3, 5, dtype=torch.float64), dim=1)
    p_s = torch.softmax(z / tau, dim=1)
    hand = tau**2 * (p_t * (p_t.log() - p_s.log())).sum(dim=1).mean()
    torch.testing.assert_close(tempered_kl(z, p_t, tau), hand)


def test_alpha_ce_plus_teacher_kd_is_the_hinton_kd_loss() -> None:
    torch.manual_seed(2)
    z, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    p_t = torch.softmax(torch.randn(6, 10) / 4.0, dim=1)
    alpha = 0.8
    ours = alpha * F.cross_entropy(z, y) + TeacherKD(1 - alpha, 4.0).penalty(
        torch.nn.Identity(), z, z, y, p_t
    )
    torch.testing.assert_close(
        ours, class_balanced_kd_loss(z, p_t, y, temperature=4.0, alpha=alpha)
    )


def test_teacher_kd_needs_batch_probs_unless_a_proxy_set_is_given() -> None:
    model = _model()
    x = torch.from_numpy(_task(0, (0, 1)).x_train[:4])
    with pytest.raises(ValueError, match="teacher_probs"):
        TeacherKD().penalty(model, x, model(x), torch.zeros(4, dtype=torch.long), None)
    proxy_x = _task(5, tuple(range(10))).x_train
    proxy_probs = np.full((len(proxy_x), 10), 0.1, dtype=np.float32)
    reg = TeacherKD(proxy_x=proxy_x, proxy_probs=proxy_probs)
    assert not reg.needs_teacher
    assert reg.penalty(model, x, model(x), torch.zeros(4, dtype=torch.long), None).item() > 0
    with pytest.raises(ValueError, match="both"):
        TeacherKD(proxy_x=proxy_x)


# --- LwF ---------------------------------------------------------------------------------------
def test_lwf_is_zero_on_the_first_task_and_uses_only_seen_classes() -> None:
    # Prepare
    model = _model()
    reg = LwF(weight=1.0, temperature=2.0)
    first, second = _task(0, (0, 1)), _task(1, (2, 3))
    x = torch.from_numpy(second.x_train)
    y = torch.from_numpy(second.y_train)
    reg.before_task(model, first)
    assert reg.penalty(model, x, model(x), y, None).item() == 0.0
    reg.after_task(model, first, first.x_train, first.y_train)
    reg.before_task(model, second)
    # Execute: perturb the student's logits of unseen classes (2-9) only.
    logits = model(x).detach().requires_grad_(True)
    same_seen = logits.detach().clone()
    same_seen[:, 2:] += torch.randn_like(same_seen[:, 2:]) * 5
    moved_seen = logits.detach().clone()
    moved_seen[:, :2] += torch.randn_like(moved_seen[:, :2]) * 5
    at_snapshot = reg.penalty(model, x, logits, y, None)
    at_snapshot.backward()
    # Assert
    assert reg.seen_classes == (0, 1)
    assert at_snapshot.item() == pytest.approx(0.0, abs=1e-6)  # student == snapshot
    assert logits.grad is not None
    assert torch.count_nonzero(logits.grad[:, 2:]) == 0
    assert reg.penalty(model, x, same_seen, y, None).item() == pytest.approx(0.0, abs=1e-6)
    assert reg.penalty(model, x, moved_seen, y, None).item() > 1e-3


def test_lwf_state_dict_round_trips_the_snapshot() -> None:
    model = _model()
    reg = LwF()
    first, second = _task(0, (0, 1)), _task(1, (2, 3))
    reg.after_task(model, first, first.x_train, first.y_train)
    reg.before_task(model, second)
    state = reg.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    restored = LwF()
    restored.load_state_dict(state)
    other = _model(seed=1)
    x = torch.from_numpy(second.x_train)
    y = torch.from_numpy(second.y_train)
    torch.testing.assert_close(
        restored.penalty(other, x, other(x), y, None), reg.penalty(other, x, other(x), y, None)
    )


def test_lwf_proxy_adds_the_snapshots_kl_on_the_proxy_inputs() -> None:
    # Prepare: a proxy set as large as the batch, so each draw is all of it, permuted.
    first, second = _task(0, (0, 1)), _task(1, (2, 3))
    proxy_x = np.random.default_rng(7).normal(size=(24, 1, 40)).astype(np.float32)
    plain, with_proxy = LwF(weight=1.5), LwFProxy(weight=1.5, proxy_x=proxy_x, seed=3)
    old, new = _model(0), _model(1)
    x, y = torch.from_numpy(second.x_train), torch.from_numpy(second.y_train)
    for reg in (plain, with_proxy):
        reg.before_task(old, first)
    assert with_proxy.penalty(new, x, new(x), y, None).item() == 0.0  # first task: no snapshot
    for reg in (plain, with_proxy):
        reg.after_task(old, first, first.x_train, first.y_train)
        reg.before_task(old, second)
    # Execute
    got = with_proxy.penalty(new, x, new(x), y, None)
    # Assert: LwF's term on the batch plus the same term on the proxy inputs.
    px = torch.from_numpy(proxy_x)
    expected = plain.penalty(new, x, new(x), y, None) + plain.penalty(new, px, new(px), y, None)
    torch.testing.assert_close(got, expected)
    assert plain.penalty(new, px, new(px), y, None).item() > 1e-5  # the proxy term is not 0


def test_replay_proxy_replays_the_teachers_labels_of_seen_classes_only() -> None:
    # Prepare: 30 proxy samples whose teacher labels cycle through 0..9.
    rng = np.random.default_rng(0)
    proxy_x = rng.normal(size=(30, 1, 40)).astype(np.float32)
    labels = np.arange(30) % 10
    probs = np.full((30, 10), 0.05, dtype=np.float32)
    probs[np.arange(30), labels] = 0.55
    reg = ReplayProxy(proxy_x=proxy_x, proxy_probs=probs)
    gen = torch.Generator().manual_seed(0)
    assert reg.extra_batch(8, gen) is None  # no task has ended: nothing to replay
    # Execute
    reg.after_task(_model(), _task(0, (0, 1)), np.zeros(0), np.zeros(0))
    batch = reg.extra_batch(8, gen)
    # Assert: the 6 proxy samples labelled 0 or 1, with those labels.
    assert batch is not None
    bx, by = batch
    assert len(by) == 6 and set(by.tolist()) <= {0, 1}
    rows = [int(np.flatnonzero((proxy_x == xi.numpy()).all(axis=(1, 2)))[0]) for xi in bx]
    assert sorted(rows) == [0, 1, 10, 11, 20, 21]
    assert by.tolist() == labels[rows].tolist()
    restored = ReplayProxy(proxy_x=proxy_x, proxy_probs=probs)
    restored.load_state_dict(reg.state_dict())
    assert restored.seen_classes == (0, 1)
    with pytest.raises(ValueError, match="same, non-zero length"):
        ReplayProxy(proxy_x=proxy_x, proxy_probs=probs[:3])


# --- EWC ---------------------------------------------------------------------------------------
def test_ewc_penalty_is_zero_at_the_anchor_and_quadratic_away_from_it() -> None:
    # Prepare
    model = _model()
    task = _task(0, (0, 1))
    reg = EWC(weight=10.0)
    x = torch.from_numpy(task.x_train)
    y = torch.from_numpy(task.y_train)
    assert reg.penalty(model, x, model(x), y, None).item() == 0.0  # no task finished yet
    reg.after_task(model, task, task.x_train, task.y_train)
    # Execute
    at_anchor = reg.penalty(model, x, model(x), y, None).item()
    with torch.no_grad():
        model.head.bias.add_(0.5)
    moved = reg.penalty(model, x, model(x), y, None).item()
    # Assert: only the head bias moved, by 0.5 each, so (lambda / 2) * sum F_bias * 0.25.
    fisher_bias = torch.from_numpy(reg.state_dict()["fisher.head.bias"])
    assert at_anchor == 0.0
    assert moved == pytest.approx(float(10.0 / 2 * (fisher_bias * 0.25).sum()), rel=1e-5)
    assert moved > 0


def test_empirical_fisher_matches_a_per_sample_loop_and_sums_over_tasks() -> None:
    model = _model()
    task = _task(0, (0, 1), n=6)
    fisher = empirical_fisher(model, task.x_train, task.y_train)
    loop = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for i in range(6):
        model.zero_grad()
        out = model(torch.from_numpy(task.x_train[i : i + 1]))
        F.log_softmax(out, dim=1)[0, int(task.y_train[i])].backward()
        for k, p in model.named_parameters():
            assert p.grad is not None
            loop[k] += p.grad**2 / 6
    for k in loop:
        torch.testing.assert_close(fisher[k], loop[k])
    # The same task twice: the accumulated Fisher doubles (sum over tasks, online EWC).
    reg = EWC()
    reg.after_task(model, task, task.x_train, task.y_train)
    reg.after_task(model, task, task.x_train, task.y_train)
    restored = EWC()
    restored.load_state_dict(reg.state_dict())
    np.testing.assert_allclose(
        restored.state_dict()["fisher.head.weight"], 2 * fisher["head.weight"].numpy(), rtol=1e-6
    )


# --- replay ------------------------------------------------------------------------------------
def test_reservoir_keeps_exactly_buffer_size_items() -> None:
    # Prepare
    reg = Replay(buffer_size=10, seed=0)
    x = np.arange(25, dtype=np.float32).reshape(25, 1, 1)
    y = np.arange(25, dtype=np.int64)
    # Execute
    reg.add(x[:4], y[:4])
    partial = len(reg)
    reg.add(x[4:], y[4:])
    # Assert
    assert partial == 4
    assert len(reg) == 10 and reg.samples_seen == 25
    bx, by = reg.buffer()
    assert len(set(by.tolist())) == 10  # no duplicates
    np.testing.assert_array_equal(bx[:, 0, 0], by.astype(np.float32))  # pairs stay together


def test_reservoir_is_uniform_over_the_stream() -> None:
    # Algorithm R keeps each of n items with probability k / n; over 200 seeds the first half
    # of a 400-item stream should hold about half the slots (std ~ 0.5 / sqrt(200 * 20)).
    y = np.arange(400, dtype=np.int64)
    x = y.astype(np.float32).reshape(-1, 1)
    first_half = []
    for seed in range(200):
        reg = Replay(buffer_size=20, seed=seed)
        reg.add(x, y)
        first_half.append(np.mean(reg.buffer()[1] < 200))
    assert float(np.mean(first_half)) == pytest.approx(0.5, abs=0.03)


def test_replay_state_dict_round_trips_and_continues_identically() -> None:
    y = np.arange(50, dtype=np.int64)
    x = np.stack([y, -y], axis=1).astype(np.float32)
    reg = Replay(buffer_size=8, seed=3)
    reg.add(x[:30], y[:30])
    restored = Replay(buffer_size=8, seed=3)
    restored.load_state_dict(reg.state_dict())
    reg.add(x[30:], y[30:])
    restored.add(x[30:], y[30:])
    for a, b in zip(reg.buffer(), restored.buffer(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(restored.state_dict()["n_seen"]) == 50
    empty = Replay(buffer_size=8)
    empty.load_state_dict(Replay(buffer_size=8).state_dict())
    assert empty.extra_batch(4, torch.Generator().manual_seed(0)) is None


def test_replay_extra_batch_has_the_batch_size_when_the_buffer_allows() -> None:
    reg = Replay(buffer_size=6, seed=0)
    y = np.arange(6, dtype=np.int64)
    reg.add(y.astype(np.float32).reshape(-1, 1), y)
    gen = torch.Generator().manual_seed(0)
    extra = reg.extra_batch(4, gen)
    assert extra is not None and extra[0].shape == (4, 1) and len(set(extra[1].tolist())) == 4
    full = reg.extra_batch(32, gen)
    assert full is not None and len(full[1]) == 6


# --- registry ----------------------------------------------------------------------------------
def test_make_regularizer_builds_each_name_and_rejects_others() -> None:
    expected = {
        "naive": NaiveFineTuning,
        "teacher-kd": TeacherKD,
        "lwf": LwF,
        "ewc": EWC,
        "replay": Replay,
    }
    assert set(REGULARIZERS) == set(expected) | {"lwf-proxy", "replay-proxy"}
    for name, cls in expected.items():
        reg = make_regularizer(name)
        assert type(reg) is cls and reg.name == name
    assert make_regularizer("replay", buffer_size=5).buffer_size == 5  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="'si'"):
        make_regularizer("si")
    x, probs = np.zeros((4, 1, 40), np.float32), np.full((4, 10), 0.1, np.float32)
    assert type(make_regularizer("lwf-proxy", proxy_x=x)) is LwFProxy
    assert type(make_regularizer("replay-proxy", proxy_x=x, proxy_probs=probs)) is ReplayProxy
