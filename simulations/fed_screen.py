"""Screen federated recipes fast: FedAvg(M) in a plain loop, no Flower, no Ray.

    python simulations/fed_screen.py --seed 0 "rounds=20" "rounds=20;cosine=1" "central=1"

Each variant is ``key=value`` pairs joined by ``;`` on top of the device-adapted
recipe (`configs/device-adapted.toml`): the same data, partitions, teacher, warm start
(60 epochs of server-side KD, lr 0.01, augmentation) and local update (`kd_train`
with the class-balanced KD loss, teacher trust, augmentation, Adam, clipping) as a
`simulate` run, every node training every round, FedAvgM at the server. It is a
screening tool: a recipe that looks good here is then measured with
`simulations/compare.py`, which runs the real federation. Keys:

* ``rounds``, ``epochs`` (local), ``lr``, ``batch`` (local), ``alpha``, ``trust`` (0/1),
  ``class-weighting`` (0/1), ``optimizer`` (adam/sgd), ``momentum`` and ``server-lr`` (server);
* ``cosine=1``: the clients' lr decays over the rounds (cosine);
* ``teacher-rounds=R/E/LR``: first adapt the teacher to the device domain by R rounds
  of FedAvg (E local epochs of CE at LR), then distil from the adapted teacher;
* ``central=1``: the same KD on the pooled client training data instead (the
  centralised ceiling's shape), for rounds x epochs, cosine within;
* ``server=1``: server-only KD instead, the tuned comparator's usual pick: from scratch
  on the public split, 60 + rounds x epochs epochs (the warm start's and the rounds'
  together), cosine, at ``lr``, augmentation on.

``--width W`` screens another student width (default ``model.student-width``, 16) for
every variant, warm start included.

It prints the test accuracy (devices' test split) and the validation accuracy
(pooled client validation shares); choose by the latter. Also printed: the average
of the last K rounds' global models (stochastic weight averaging over rounds).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from edgekd.core.config import EdgeKDConfig
from edgekd.core.data import ArrayDataset, client_split, load_federated_data
from edgekd.core.specs import spec_for
from edgekd.learn.augment import Augment
from edgekd.learn.models import build_model
from edgekd.learn.training import (
    KDSettings,
    kd_train,
    predict_logits,
    seed_everything,
    teacher_probs_for,
)
from edgekd.server.comparators import DEFAULT_AUGMENT
from edgekd.server.teacher import obtain_teacher

DEFAULTS = {
    "rounds": "20",
    "epochs": "3",
    "lr": "0.01",
    "alpha": "0.8",
    "trust": "1",
    "class-weighting": "1",
    "optimizer": "adam",
    "momentum": "0.5",
    "server-lr": "1",
    "batch": "64",
    "cosine": "0",
    "central": "0",
}
State = dict[str, torch.Tensor]


def accuracy(model: nn.Module, split: ArrayDataset) -> float:
    return float((predict_logits(model, split.x).argmax(1) == split.y).mean())


def state_of(model: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Screen:
    """One seed's data, teacher and warm start, shared by every variant."""

    def __init__(self, seed: int, partition: str, nodes: int, width: int | None = None) -> None:
        torch.set_num_threads(1)
        seed_everything(seed)
        self.seed = seed
        cfg = EdgeKDConfig(seed=seed)
        if width is not None:
            cfg = replace(cfg, model=replace(cfg.model, student_width=width))
        self.data = load_federated_data(cfg.data, seed)
        splits = [client_split(self.data, partition, i, nodes, seed, 0.1) for i in range(nodes)]
        self.clients = [train for train, _ in splits]
        self.train = _pool(self.clients)
        self.val = _pool([val for _, val in splits])
        shape, classes = self.data.input_shape, self.data.num_classes
        self.student_spec = spec_for(shape, classes, cfg.model.student_width)
        self.teacher = obtain_teacher(
            cfg, self.data, spec_for(shape, classes, cfg.model.teacher_width)
        )
        self.augment = Augment.from_spec(DEFAULT_AUGMENT)
        self.warm = build_model(self.student_spec)
        probs = teacher_probs_for(self.teacher, self.data.public.x, 4.0)
        warm = self.settings({"alpha": "0", "trust": "0", "class-weighting": "0"}, 60, 0.01)
        self.fit(self.warm, self.data.public, probs, replace(warm, cosine=True), seed)
        self.history: list[State] = []

    def settings(self, opts: dict[str, str], epochs: int, lr: float) -> KDSettings:
        o = {**DEFAULTS, **opts}
        return KDSettings(
            epochs=epochs,
            lr=lr,
            batch_size=int(o["batch"]),
            temperature=4.0,
            alpha=float(o["alpha"]),
            class_weighting=o["class-weighting"] == "1",
            clip_norm=2.0,
            optimizer=o["optimizer"],
            augment=self.augment,
            trust_correct=o["trust"] == "1",
        )

    def fit(
        self,
        model: nn.Module,
        split: ArrayDataset,
        probs: np.ndarray | None,
        s: KDSettings,
        seed: int,
    ) -> None:
        kd_train(model, split.x, split.y, probs, s, num_classes=self.data.num_classes, seed=seed)

    def fedavg(
        self,
        model: nn.Module,
        rounds: int,
        settings_at: Callable[[int], KDSettings],
        teacher: nn.Module | None,
        momentum: float,
        server_lr: float = 1.0,
    ) -> nn.Module:
        """FedAvgM (Hsu et al. 2019) over every client, each round: ``w -= server_lr * v``."""
        velocity: State | None = None
        self.history = []
        for r in range(rounds):
            velocity = self.fedavg_round(
                model, r, settings_at(r), teacher, velocity, momentum, server_lr
            )
            self.history.append(state_of(model))
        return model

    def fedavg_round(
        self,
        model: nn.Module,
        r: int,
        settings: KDSettings,
        teacher: nn.Module | None,
        velocity: State | None,
        momentum: float,
        server_lr: float = 1.0,
        clients: list[int] | None = None,
    ) -> State:
        """Round ``r`` of FedAvgM over ``clients`` (default: all), in place on ``model``;
        returns the new server velocity."""
        states, sizes = [], []
        for i in clients if clients is not None else range(len(self.clients)):
            split = self.clients[i]
            local = copy.deepcopy(model)
            probs = teacher_probs_for(teacher, split.x, 4.0) if teacher is not None else None
            self.fit(local, split, probs, settings, self.seed * 1000 + r * 37 + i)
            states.append(state_of(local))
            sizes.append(len(split))
        w = np.asarray(sizes, dtype=float) / sum(sizes)
        old = state_of(model)
        avg = {
            k: sum(float(wi) * s[k].float() for wi, s in zip(w, states, strict=True)) for k in old
        }
        delta = {k: old[k].float() - avg[k] for k in old}
        if velocity is not None:
            delta = {k: momentum * velocity[k] + delta[k] for k in old}
        velocity = delta
        model.load_state_dict(
            {k: (old[k].float() - server_lr * velocity[k]).to(old[k].dtype) for k in old}
        )
        return velocity

    def adapted_teacher(self, spec: str) -> nn.Module:
        rounds, epochs, lr = spec.split("/")
        settings = self.settings({"trust": "0"}, int(epochs), float(lr))
        teacher = self.fedavg(
            copy.deepcopy(self.teacher), int(rounds), lambda r: settings, None, 0.0
        )
        print(f"  teacher adapted by {spec}: test {accuracy(teacher, self.data.test):.4f}")
        return teacher

    def run(self, variant: str) -> None:
        start = time.perf_counter()
        opts = dict(kv.split("=", 1) for kv in variant.split(";") if kv)
        o = {**DEFAULTS, **opts}
        rounds, epochs, lr = int(o["rounds"]), int(o["epochs"]), float(o["lr"])
        teacher = (
            self.adapted_teacher(o["teacher-rounds"]) if "teacher-rounds" in o else self.teacher
        )
        model = copy.deepcopy(self.warm)
        if o.get("server") == "1":
            model = build_model(self.student_spec)
            probs = teacher_probs_for(teacher, self.data.public.x, 4.0)
            s = replace(self.settings(opts, 60 + rounds * epochs, lr), cosine=True)
            self.fit(model, self.data.public, probs, s, self.seed)
            self._show(variant, model, start)
            return
        if o["central"] == "1":
            probs = teacher_probs_for(teacher, self.train.x, 4.0)
            s = replace(self.settings(opts, rounds * epochs, lr), cosine=True)
            self.fit(model, self.train, probs, s, self.seed)
            self._show(variant, model, start)
            return

        def settings_at(r: int) -> KDSettings:
            rate = lr * 0.5 * (1 + math.cos(math.pi * r / rounds)) if o["cosine"] == "1" else lr
            return self.settings(opts, epochs, rate)

        self.fedavg(
            model, rounds, settings_at, teacher, float(o["momentum"]), float(o["server-lr"])
        )
        self._show(variant, model, start)
        for k in sorted({3, 5, max(rounds // 2, 1)}):
            avg = copy.deepcopy(model)
            last = self.history[-k:]
            avg.load_state_dict({n: sum(h[n].float() for h in last) / len(last) for n in last[0]})
            print(f"    average of the last {k} rounds: {self._scores(avg)}")

    def _scores(self, model: nn.Module) -> str:
        return f"test {accuracy(model, self.data.test):.4f} val {accuracy(model, self.val):.4f}"

    def _show(self, variant: str, model: nn.Module, start: float) -> None:
        print(f"  [{variant}] {self._scores(model)} ({time.perf_counter() - start:.0f} s)")


def _pool(splits: list[ArrayDataset]) -> ArrayDataset:
    return ArrayDataset(
        np.concatenate([s.x for s in splits]), np.concatenate([s.y for s in splits])
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--nodes", type=int, default=20, help="clients (simulate: 20)")
    parser.add_argument("--width", type=int, default=None, help="student width (16)")
    parser.add_argument("variants", nargs="+")
    args = parser.parse_args()
    screen = Screen(args.seed, args.partition, args.nodes, args.width)
    d = screen.data
    print(
        f"seed {args.seed}: teacher {accuracy(screen.teacher, d.test):.4f}, "
        f"warm start {accuracy(screen.warm, d.test):.4f}",
        flush=True,
    )
    for variant in args.variants:
        screen.run(variant)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
