"""Avalanche's own Naive, LwF, EWC and Replay on edgekd's class-incremental stream:
centralised anchors for the federated table of `simulations/continual.py`.

    python simulations/avalanche_anchors.py --seeds 0 1 2

It needs `avalanche-lib` (0.6.0), which needs a torchvision that imports. On x86_64 the
registries' only one that imports is a CUDA build beside torch 2.14.1, so run it from a
venv of its own (it runs on the CPU), never the project's:

    python3 -m venv /tmp/avl && /tmp/avl/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/avl/bin/pip install avalanche-lib==0.6.0 mnist1d && /tmp/avl/bin/pip install --no-deps -e .
    /tmp/avl/bin/python simulations/avalanche_anchors.py --seeds 0 1 2

What is the same as the federated runs: the stream (`edgekd.continual.scenario.
client_stream`, the devices' draw of each seed: 5 tasks of 2 mnist1d classes), the
student (`model.student-width`), Adam at `train.lr`, `train.batch-size`, and the epochs a
node spends on a task (``continual.rounds-per-task x train.local-epochs``, over the
task's whole training data, centrally). LwF's alpha and temperature are edgekd's
`continual.weight` and `continual.temperature`, EWC's lambda `continual.ewc-weight`,
Replay's memory the ten nodes' buffers together (10 x `continual.buffer-size`).
What is Avalanche's own: every strategy's loss and plugin code, and its plain
classifier (cross-entropy over all ten outputs, no masking of unseen classes; predictions
over all ten), as in its reference runs on SplitMNIST.

Prints a markdown table (average accuracy, lowest diagonal entry of R, forgetting, mean
± std over the seeds) and writes it, with every seed's matrix, to
``simulations/results/avalanche/summary.{md,json}``; a later invocation (other methods
or seeds) adds to that file, replacing only what it measures again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tomllib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd.continual.metrics import summarize
from edgekd.continual.scenario import client_stream
from edgekd.continual.streams import TaskStream
from edgekd.core.config import EdgeKDConfig
from edgekd.core.specs import spec_for
from edgekd.learn.models import build_model

METHODS = ("naive", "lwf", "ewc", "replay")


class _Tensors(torch.utils.data.TensorDataset):
    """A TensorDataset with the ``targets`` Avalanche reads the classes from."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        super().__init__(torch.from_numpy(x).float(), torch.from_numpy(y).long())
        self.targets = torch.from_numpy(y).long()


def _benchmark(stream: TaskStream) -> Any:
    from avalanche.benchmarks import nc_benchmark

    train = _Tensors(
        np.concatenate([t.x_train for t in stream]), np.concatenate([t.y_train for t in stream])
    )
    test = _Tensors(
        np.concatenate([t.x_test for t in stream]), np.concatenate([t.y_test for t in stream])
    )
    order = [c for t in stream for c in t.classes]
    return nc_benchmark(
        train, test, len(stream), task_labels=False, fixed_class_order=order, seed=0
    )


def _masked_ce() -> Any:
    """Avalanche's `MaskedCrossEntropy(mask="seen")` with one change: its loss is
    ``-(onehot * softmax(z).log())``, whose gradient turns NaN once a probability
    underflows to 0 (every weight was NaN after task 1 here, 30 epochs at Adam 0.01);
    this one takes ``log_softmax``, the same loss computed stably."""
    from avalanche.training.losses import MaskedCrossEntropy

    class StableMaskedCrossEntropy(MaskedCrossEntropy):  # type: ignore[misc]
        def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            cols = sorted(self.current_mask(logits.shape[1]))
            onehot = nn.functional.one_hot(targets, logits.shape[1])[:, cols].float()
            return -(onehot * logits[:, cols].log_softmax(1)).sum(1).mean()

    return StableMaskedCrossEntropy(mask="seen")


def _strategy(method: str, model: nn.Module, cfg: EdgeKDConfig, masked: bool) -> Any:
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import EWC, LwF, Naive, Replay

    t, cl = cfg.train, cfg.continual
    common = {
        "model": model,
        "optimizer": torch.optim.Adam(model.parameters(), lr=t.lr),
        "criterion": _masked_ce() if masked else nn.CrossEntropyLoss(),
        "train_mb_size": t.batch_size,
        "train_epochs": cl.rounds_per_task * t.local_epochs,
        "eval_mb_size": 512,
        "device": "cpu",
        "evaluator": EvaluationPlugin(loggers=[]),
    }
    if method == "naive":
        return Naive(**common)
    if method == "lwf":
        return LwF(alpha=cl.weight, temperature=cl.temperature, **common)
    if method == "ewc":
        return EWC(ewc_lambda=cl.ewc_weight, **common)
    return Replay(mem_size=10 * cl.buffer_size, **common)


def _row(model: nn.Module, stream: TaskStream, seen: tuple[int, ...] | None) -> list[float]:
    """Accuracy on every task's test set; predictions among ``seen`` classes only if given."""
    model.eval()
    row = []
    with torch.no_grad():
        for task in stream:
            logits = model(torch.from_numpy(task.x_test).float())
            if seen is not None:
                mask = torch.full((logits.shape[1],), float("-inf"))
                mask[list(seen)] = 0.0
                logits = logits + mask
            row.append(float((logits.argmax(1).numpy() == task.y_test).mean()))
    return row


def run(method: str, cfg: EdgeKDConfig, masked: bool) -> dict[str, Any]:
    """One method over the stream of ``cfg.seed``: its accuracy matrix and summary. With
    ``masked`` the cross-entropy and the predictions cover the classes seen so far
    (Avalanche's `MaskedCrossEntropy(mask="seen")`, as edgekd's `continual.mask-unseen`)."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    stream = client_stream(cfg)
    model = build_model(spec_for(stream.input_shape, stream.num_classes, cfg.model.student_width))
    baseline = np.asarray(_row(model, stream, stream.classes_up_to(0) if masked else None))
    strategy = _strategy(method, model, cfg, masked)
    start = time.perf_counter()
    rows = []
    for task_id, experience in enumerate(_benchmark(stream).train_stream):
        strategy.train(experience)
        rows.append(_row(model, stream, stream.classes_up_to(task_id) if masked else None))
    out = summarize(np.asarray(rows), baseline)
    return {**out, "matrix": rows, "wall_time": time.perf_counter() - start}


def _config(path: str | None, sets: list[str], seed: int) -> EdgeKDConfig:
    """Defaults <- ``--config`` <- ``--set``, as `edgekd simulate` reads them."""
    cfg = EdgeKDConfig()
    if path:
        cfg = cfg.with_overrides(tomllib.loads(Path(path).read_text()))
    flat = dict(item.split("=", 1) for item in sets)
    return cfg.with_overrides({**flat, "seed": seed})


def _cell(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", help="the TOML the federated runs used (defaults if none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--heads",
        nargs="+",
        default=["plain", "masked"],
        choices=["plain", "masked"],
        help="plain: CE over all ten outputs; masked: over the classes seen so far",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    names = [f"{m} ({h})" for h in args.heads for m in args.methods]
    results: dict[str, dict[str, Any]] = {n: {} for n in names}
    for seed in args.seeds:
        cfg = _config(args.config, ["continual.scenario=class-incremental", *args.set], seed)
        for name in names:
            method, head = name.split(" ")
            results[name][str(seed)] = out = run(method, cfg, head == "(masked)")
            diag = " ".join(f"{r[i]:.3f}" for i, r in enumerate(out["matrix"]))
            print(f"seed {seed} {name}: avg {out['avg_accuracy']:.3f} diag {diag}", flush=True)
    root = Path("simulations/results/avalanche")
    saved = root / "summary.json"
    if saved.exists():  # keep what earlier invocations measured (other methods or seeds)
        earlier = json.loads(saved.read_text())
        results = {n: {**earlier.get(n, {}), **r} for n, r in {**earlier, **results}.items()}
    lines = [
        "| Avalanche strategy (centralised) | avg accuracy | lowest R_ii, any seed | forgetting |",
        "|---|---|---|---|",
    ]
    for method, by_seed in results.items():
        runs = list(by_seed.values())
        lowest = min(r["matrix"][i][i] for r in runs for i in range(len(r["matrix"])))
        lines.append(
            f"| {method} | {_cell([r['avg_accuracy'] for r in runs])} | {lowest:.3f} | "
            f"{_cell([r['forgetting'] for r in runs])} |"
        )
    text = "\n".join(lines)
    print(f"\n{text}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.md").write_text(text + "\n")
    (root / "summary.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
