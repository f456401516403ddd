"""Screen heterogeneous students for [hetero] (18): a small and a large student in one
federation, each averaged within its device class, with and without a FedDF-style
server step across the classes. A plain loop, no Flower, like `fed_screen.py`.

    python simulations/hetero_screen.py --seed 0 --small 8 --large 32 --rounds 20

The nodes of `fed_screen.Screen` (same data, partitions, teacher, local KD update) are
split into two device classes, even partition ids small, odd large. Each class's student
starts from its own warm start (server-side KD on the public split) and is averaged
(FedAvgM, momentum 0.5) over its own class's nodes only. Variants, per round:

* ``own``: nothing else: each class is a federation of its own class only (the
  comparator of the issue's must-show: same nodes' data, rounds and seed);
* ``feddf``: after averaging, each class's student is distilled on the public split
  toward the ensemble of the teacher and every class's averaged student, logits averaged
  (FedDF: Lin et al., "Ensemble Distillation for Robust Model Fusion in Federated
  Learning", NeurIPS 2020, Alg. 1, with the server's teacher as one more member):
  ``p = softmax(mean_m z_m(x) / tau)`` over m in {teacher, small, large}, then
  ``epochs`` epochs of KD toward ``p`` (Adam, ``lr``);
* ``teacher-step``: the same server step toward the teacher alone (no class's student in
  the ensemble): what the step gains without the other class;
* ``peer-local``: the teacher step, and the small class's nodes take their local soft
  targets from the mean logits of the teacher and the large class's student as the round
  starts (shipped to them, run on their own data) instead of the teacher alone.

Prints each class's test accuracy (devices' test split) and validation accuracy (pooled
client validation shares) after the last round. A screening tool: nothing here is the
product's strategy.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from fed_screen import Screen, State, accuracy  # noqa: E402

from edgekd.core.data import ArrayDataset  # noqa: E402
from edgekd.learn.training import predict_logits, soft_targets  # noqa: E402

CLASSES = ("small", "large")


def _ensemble_probs(members: list[nn.Module], x: np.ndarray, tau: float) -> np.ndarray:
    logits = np.mean([predict_logits(m, x) for m in members], axis=0)
    with torch.no_grad():
        return soft_targets(torch.from_numpy(logits), tau).numpy()


class LogitMean(nn.Module):
    """The mean of its members' logits: an ensemble that runs where a model runs."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def run(args: argparse.Namespace, variant: str) -> dict[str, tuple[float, float]]:
    screens = {
        "small": Screen(args.seed, args.partition, args.nodes, args.small),
        "large": Screen(args.seed, args.partition, args.nodes, args.large),
    }
    nodes = {"small": list(range(0, args.nodes, 2)), "large": list(range(1, args.nodes, 2))}
    models = {c: copy.deepcopy(screens[c].warm) for c in CLASSES}
    velocity: dict[str, State | None] = {c: None for c in CLASSES}
    public: ArrayDataset = screens["small"].data.public
    for r in range(args.rounds):
        large_now = copy.deepcopy(models["large"])  # as the round ships it
        for c in CLASSES:
            local = screens[c].settings({}, 3, 0.01)
            teacher: nn.Module = screens[c].teacher
            if variant == "peer-local" and c == "small":
                teacher = LogitMean([teacher, large_now])
            velocity[c] = screens[c].fedavg_round(
                models[c], r, local, teacher, velocity[c], 0.5, clients=nodes[c]
            )
        if variant in ("feddf", "teacher-step", "peer-local"):
            members = [screens["small"].teacher]
            if variant == "feddf":
                members += list(models.values())
            probs = _ensemble_probs(members, public.x, 4.0)
            for c in CLASSES:
                s = screens[c].settings(
                    {"alpha": "0", "trust": "0", "class-weighting": "0"}, args.epochs, args.lr
                )
                screens[c].fit(models[c], public, probs, s, args.seed * 1000 + r)
    return {
        c: (accuracy(models[c], screens[c].data.test), accuracy(models[c], screens[c].val))
        for c in CLASSES
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--small", type=int, default=8, help="small class's student width")
    parser.add_argument("--large", type=int, default=32, help="large class's student width")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1, help="FedDF epochs per round")
    parser.add_argument("--lr", type=float, default=1e-3, help="FedDF Adam lr")
    parser.add_argument(
        "variants", nargs="*", help="own, teacher-step, feddf, peer-local (own feddf)"
    )
    args = parser.parse_args()
    args.variants = args.variants or ["own", "feddf"]
    unknown = set(args.variants) - {"own", "teacher-step", "feddf", "peer-local"}
    if unknown:
        parser.error(
            f"unknown variants {sorted(unknown)}; choose from own, teacher-step, feddf, peer-local"
        )
    for variant in args.variants:
        out = run(args, variant)
        cells = ", ".join(f"{c} test {t:.4f} val {v:.4f}" for c, (t, v) in out.items())
        print(f"[{variant}] {cells}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
