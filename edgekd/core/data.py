"""Datasets, domain shift and federated partitions (numpy; no torch, no flwr).

Every split is a pure function of the `DataConfig` and the seed, so a SuperNode on a
device rebuilds exactly its own partition from ``(seed, partition-id,
num-partitions)`` without talking to anyone.

Two domains are drawn:

* the **server domain**: what the server holds. Its ``public`` split trains the
  teacher and serves as the proxy set; ``server_test`` measures the teacher there.
* the **device domain**: what the clients see. With ``client_shift`` it is drawn
  differently (mnist1d: stronger correlated noise and shear; images: noise and
  translation), which is the situation edge distillation is for. Its ``pool`` is
  partitioned across clients and its ``test`` split scores every model.

mnist1d generation takes seconds, so generated arrays are cached on disk (an
atomic write, safe when several Ray actors race) under ``$EDGEKD_CACHE_DIR`` or
``~/.cache/edgekd``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.core.config import DataConfig, parse_partition
from edgekd.core.data_files import CLASS_NAMES, load_cifar10_folder, load_idx_folder
from edgekd.core.errors import ConfigError

# The device-domain shift for mnist1d: the values of the trial, under which
# a teacher trained on the default domain drops from ~0.94 to ~0.88.
MNIST1D_SHIFT = {"corr_noise_scale": 0.32, "iid_noise_scale": 0.03, "shear_scale": 0.85}


@dataclass(frozen=True)
class ArrayDataset:
    """Inputs ``x`` (float32, N×C×…) and integer labels ``y`` (int64, N)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: np.ndarray) -> ArrayDataset:
        return ArrayDataset(self.x[index], self.y[index])


@dataclass(frozen=True)
class FederatedData:
    """All splits of one run; see the module docstring for what each is for."""

    public: ArrayDataset
    server_test: ArrayDataset
    pool: ArrayDataset
    test: ArrayDataset
    num_classes: int
    class_names: list[str]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.public.x.shape[1:])


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEKD_CACHE_DIR", Path.home() / ".cache" / "edgekd"))


def load_federated_data(cfg: DataConfig, seed: int) -> FederatedData:
    """Load (or generate) both domains and cut them into the four splits."""
    return _load_federated_data(cfg, seed)


@functools.lru_cache(maxsize=4)
def _load_federated_data(cfg: DataConfig, seed: int) -> FederatedData:
    server_x, server_y, device_x, device_y = _load_domains(cfg, seed)
    rng = np.random.default_rng([seed, 1])
    s_order = rng.permutation(len(server_y))
    d_order = rng.permutation(len(device_y))
    n_public = int(round(cfg.public_fraction * len(server_y)))
    n_server_test = int(round(cfg.test_fraction * len(server_y)))
    n_test = int(round(cfg.test_fraction * len(device_y)))
    public = ArrayDataset(server_x[s_order[:n_public]], server_y[s_order[:n_public]])
    st = s_order[n_public : n_public + n_server_test]
    server_test = ArrayDataset(server_x[st], server_y[st])
    test = ArrayDataset(device_x[d_order[:n_test]], device_y[d_order[:n_test]])
    # The device pool excludes the public share too, so client and public data
    # never hold the same generated sample when there is no shift.
    pool_idx = d_order[n_test + n_public :]
    pool = ArrayDataset(device_x[pool_idx], device_y[pool_idx])
    num_classes = int(max(server_y.max(), device_y.max())) + 1
    names = CLASS_NAMES.get(cfg.dataset, [str(c) for c in range(num_classes)])
    return FederatedData(public, server_test, pool, test, num_classes, list(names))


def _load_domains(cfg: DataConfig, seed: int) -> tuple[np.ndarray, ...]:
    if cfg.dataset == "mnist1d":
        server = _mnist1d(cfg.num_samples, seed, shift=False)
        device = _mnist1d(cfg.num_samples, seed + 1, shift=cfg.client_shift)
        return (*server, *device)
    x, y = _load_pooled(cfg)
    rng = np.random.default_rng([seed, 2])
    order = rng.permutation(len(y))
    half = len(y) // 2
    sx, sy = x[order[:half]], y[order[:half]]
    dx, dy = x[order[half:]], y[order[half:]]
    if cfg.client_shift:
        dx = shift_images(dx, np.random.default_rng([seed, 3]))
    return sx, sy, dx, dy


def _load_pooled(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    if cfg.dataset == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (bunch.data.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
        return x, bunch.target.astype(np.int64)
    if cfg.dataset in ("mnist", "fashion-mnist"):
        xtr, ytr, xte, yte = load_idx_folder(cfg.data_dir, cfg.dataset)
    else:
        xtr, ytr, xte, yte = load_cifar10_folder(cfg.data_dir)
    return np.concatenate([xtr, xte]), np.concatenate([ytr, yte])


def shift_images(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Device-domain shift for images: a random translation of up to 1/8 of the side
    and additive Gaussian noise (σ = 0.1), both fixed per sample by the seed."""
    out = np.empty_like(x)
    side = x.shape[-1]
    max_shift = max(1, side // 8)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(len(x), 2))
    for i, (dy, dx) in enumerate(shifts):
        out[i] = np.roll(x[i], (int(dy), int(dx)), axis=(-2, -1))
    out += rng.normal(0.0, 0.1, size=x.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _mnist1d(num_samples: int, seed: int, *, shift: bool) -> tuple[np.ndarray, np.ndarray]:
    """mnist1d (Greydanus & Kobak 2024) generated locally, train and test pooled."""
    overrides: dict[str, float | int] = {"num_samples": num_samples, "seed": seed}
    if shift:
        overrides.update(MNIST1D_SHIFT)
    raw = generate_mnist1d(overrides)
    x = np.concatenate([raw["x"], raw["x_test"]])
    y = np.concatenate([raw["y"], raw["y_test"]])
    return x, y


def generate_mnist1d(overrides: Mapping[str, float | int]) -> dict[str, np.ndarray]:
    """``make_dataset`` with ``overrides`` of ``get_dataset_args()``, as ``x``, ``y``,
    ``x_test``, ``y_test`` (x as float32 ``(N, 1, L)``), cached on disk by the overrides.

    Generation is a python loop per sample (~0.25 s per 1 000); the cache file is written
    to a temporary name and renamed, because Ray actors may race on it.
    """
    key = hashlib.sha256(json.dumps(dict(overrides), sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"mnist1d-raw-{key}.npz"
    names = ("x", "y", "x_test", "y_test")
    if path.exists():
        try:
            with np.load(path) as f:
                return {name: f[name] for name in names}
        except (OSError, ValueError, KeyError):
            pass  # a corrupt cache entry is regenerated below
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    for name, value in overrides.items():
        setattr(args, name, value)
    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(state)
    arrays = {
        "x": raw["x"].astype(np.float32)[:, None, :],
        "y": raw["y"].astype(np.int64),
        "x_test": raw["x_test"].astype(np.float32)[:, None, :],
        "y_test": raw["y_test"].astype(np.int64),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **arrays)
    os.replace(tmp.name, path)
    return arrays


# ------------------------------------------------------------------ partitions
def check_partition_count(
    num_partitions: int,
    num_samples: int,
    what: str = "the device pool",
    more_data: str = "data.num-samples",
) -> None:
    """Refuse more partitions than samples, which flwr-datasets' partitioners cannot cut
    (they raise deep inside a node, once per node and round), naming the two knobs."""
    if num_partitions > num_samples:
        raise ConfigError(
            f"{num_partitions} nodes share {what} of {num_samples} samples; flwr-datasets "
            "cannot cut more partitions than samples: use fewer nodes (--num-clients, or "
            f"the nodes' num-partitions) or more data ({more_data})"
        )


def partition_indices(
    labels: np.ndarray, spec: str, num_partitions: int, seed: int
) -> list[np.ndarray]:
    """Indices of each client's share, through flwr-datasets' partitioners.

    ``iid`` → `IidPartitioner`; ``dirichlet:<alpha>`` → `DirichletPartitioner` (label
    skew, Hsu et al. 2019); ``pathological:<k>`` → `PathologicalPartitioner` (k
    classes per client, McMahan et al. 2017).
    """
    return [partition_of(labels, spec, num_partitions, seed, pid) for pid in range(num_partitions)]


def partition_of(
    labels: np.ndarray, spec: str, num_partitions: int, seed: int, partition_id: int
) -> np.ndarray:
    """One client's share of `partition_indices`, without materialising the others': a
    simulated node of a 10 000-client fleet pays about 1 ms for its own share, not 8 s
    for every share (the partitioner, kept per process, assigns all indices at once)."""
    key = np.ascontiguousarray(labels, dtype=np.int64).tobytes()  # hashes in microseconds
    return _partition_of(key, spec, num_partitions, seed, partition_id)


@functools.lru_cache(maxsize=1024)  # the shares a process trained on lately, a few KB each
def _partition_of(
    labels: bytes, spec: str, num_partitions: int, seed: int, partition_id: int
) -> np.ndarray:
    partitioner = _partitioner(labels, spec, num_partitions, seed)
    share = np.asarray(partitioner.load_partition(partition_id)["idx"], dtype=np.int64)
    share.flags.writeable = False  # shared by every caller of the cache
    return share


@functools.lru_cache(maxsize=8)
def _partitioner(labels_bytes: bytes, spec: str, num_partitions: int, seed: int) -> Any:
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        Partitioner,
        PathologicalPartitioner,
    )

    if num_partitions < 1:
        raise ValueError(f"num-partitions must be >= 1, got {num_partitions}")
    check_partition_count(num_partitions, len(labels_bytes) // 8)
    kind, arg = parse_partition(spec)
    partitioner: Partitioner
    if kind == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif kind == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=arg,
            min_partition_size=0,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    else:
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=int(arg),
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    labels = np.frombuffer(labels_bytes, dtype=np.int64).tolist()
    partitioner.dataset = Dataset.from_dict({"label": labels, "idx": list(range(len(labels)))})
    return partitioner


def client_split(
    data: FederatedData,
    spec: str,
    partition_id: int,
    num_partitions: int,
    seed: int,
    val_fraction: float,
) -> tuple[ArrayDataset, ArrayDataset]:
    """One client's local (train, validation) data from the device pool."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    index = partition_of(data.pool.y, spec, num_partitions, seed, partition_id)
    # Positions, not ``index`` itself: the cached share is read-only, and numpy shuffles an
    # empty array in place where it copies any other.
    index = index[np.random.default_rng([seed, 4, partition_id]).permutation(len(index))]
    n_val = int(round(val_fraction * len(index))) if len(index) > 1 else 0
    local = data.pool.subset(index)
    return local.subset(np.arange(n_val, len(index))), local.subset(np.arange(n_val))


def pooled_client_splits(
    data: FederatedData, spec: str, num_partitions: int, seed: int, val_fraction: float
) -> tuple[ArrayDataset, ArrayDataset]:
    """Every client's (train, validation) share of the device pool, pooled: what the
    nodes train on and the validation data no model trains on, as if it could leave the
    devices (a simulation's centralised ceiling and its comparators' tuning split)."""
    splits = [
        client_split(data, spec, pid, num_partitions, seed, val_fraction)
        for pid in range(num_partitions)
    ]
    train = ArrayDataset(
        np.concatenate([t.x for t, _ in splits]), np.concatenate([t.y for t, _ in splits])
    )
    val = ArrayDataset(
        np.concatenate([v.x for _, v in splits]), np.concatenate([v.y for _, v in splits])
    )
    return train, val
