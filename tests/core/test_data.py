"""Data splits and partitions: sizes, purity of a client's partition, label skew."""

from __future__ import annotations

import numpy as np
import pytest

from edgekd.core.config import DataConfig
from edgekd.core.data import _partition_of as cached_shares
from edgekd.core.data import _partitioner as cached_partitioner
from edgekd.core.data import (
    client_split,
    load_federated_data,
    partition_indices,
    partition_of,
    shift_images,
)
from edgekd.core.errors import ConfigError


@pytest.fixture(scope="module")
def mnist1d_small():  # type: ignore[no-untyped-def]
    return load_federated_data(DataConfig(num_samples=1000), seed=3)


def test_splits_have_the_configured_sizes(mnist1d_small) -> None:  # type: ignore[no-untyped-def]
    d = mnist1d_small
    assert len(d.public) == 300  # 30 % of the server domain
    assert len(d.server_test) == 200
    assert len(d.test) == 200  # 20 % of the device domain
    assert len(d.pool) == 1000 - 200 - 300
    assert d.input_shape == (1, 40)
    assert d.num_classes == 10
    assert d.public.x.dtype == np.float32 and d.public.y.dtype == np.int64


def test_client_shift_changes_the_device_domain() -> None:
    shifted = load_federated_data(DataConfig(num_samples=1000, client_shift=True), seed=3)
    plain = load_federated_data(DataConfig(num_samples=1000, client_shift=False), seed=3)
    # Same server domain, different device domain.
    np.testing.assert_array_equal(shifted.public.x, plain.public.x)
    assert not np.allclose(shifted.test.x, plain.test.x)


def test_partition_is_a_pure_function_of_seed_and_ids(mnist1d_small) -> None:  # type: ignore[no-untyped-def]
    a_train, a_val = client_split(mnist1d_small, "dirichlet:0.5", 3, 10, seed=7, val_fraction=0.1)
    b_train, b_val = client_split(mnist1d_small, "dirichlet:0.5", 3, 10, seed=7, val_fraction=0.1)
    np.testing.assert_array_equal(a_train.y, b_train.y)
    np.testing.assert_array_equal(a_val.x, b_val.x)


def test_a_node_with_an_empty_share_gets_empty_splits_every_time(mnist1d_small) -> None:  # type: ignore[no-untyped-def]
    # Prepare: half as many nodes as pool samples, so many Dirichlet shares are empty (the
    # partitioner's cache hands them out read-only; numpy once shuffled those in place and
    # failed).
    spec, nodes = "dirichlet:0.5", len(mnist1d_small.pool) // 2
    sizes = [len(partition_of(mnist1d_small.pool.y, spec, nodes, 7, p)) for p in range(nodes)]
    empty = sizes.index(0)
    # Execute
    runs = [client_split(mnist1d_small, spec, empty, nodes, seed=7, val_fraction=0.1) for _ in "ab"]
    # Assert
    for train, val in runs:
        assert len(train) == len(val) == 0
        assert train.x.shape[1:] == mnist1d_small.pool.x.shape[1:]


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "pathological:2"])
def test_more_partitions_than_samples_is_refused_naming_the_knobs(spec: str) -> None:
    labels = np.arange(30) % 10
    with pytest.raises(ConfigError, match=r"31 nodes share .* 30 samples.*data\.num-samples"):
        partition_of(labels, spec, 31, seed=0, partition_id=0)
    if not spec.startswith("pathological"):  # which has its own per-label limit, named
        assert len(partition_indices(labels, spec, 30, seed=0)) == 30  # as many is fine


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.1", "pathological:2"])
def test_partitions_cover_the_pool_without_overlap(spec: str) -> None:
    labels = np.random.default_rng(0).integers(0, 10, size=2000)
    parts = partition_indices(labels, spec, 8, seed=1)
    joined = np.concatenate(parts)
    assert len(parts) == 8
    assert len(np.unique(joined)) == len(joined)  # no sample in two clients
    if spec == "iid":
        assert sorted(joined.tolist()) == list(range(2000))


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "pathological:2"])
def test_one_clients_share_alone_is_its_share_of_the_whole_cut(spec: str) -> None:
    # A simulated node asks for its own share first, in a process that has cut nothing.
    labels = np.random.default_rng(0).integers(0, 10, size=3000)
    whole = partition_indices(labels, spec, 300, seed=7)
    cached_partitioner.cache_clear()
    cached_shares.cache_clear()

    alone = [partition_of(labels, spec, 300, seed=7, partition_id=pid) for pid in (299, 5, 0)]

    for pid, share in zip((299, 5, 0), alone, strict=True):
        np.testing.assert_array_equal(share, whole[pid])
    assert sum(len(w) for w in whole) == 3000


def test_pathological_gives_k_classes_per_client() -> None:
    labels = np.random.default_rng(0).integers(0, 10, size=2000)
    for part in partition_indices(labels, "pathological:2", 10, seed=1):
        assert len(np.unique(labels[part])) <= 2


def test_dirichlet_low_alpha_is_skewed() -> None:
    labels = np.random.default_rng(0).integers(0, 10, size=5000)
    parts = partition_indices(labels, "dirichlet:0.1", 10, seed=1)
    top_share = [
        np.bincount(labels[p], minlength=10).max() / max(len(p), 1) for p in parts if len(p)
    ]
    assert np.mean(top_share) > 0.5  # IID would give ~0.1


def test_client_split_rejects_bad_partition_id(mnist1d_small) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="partition-id 5"):
        client_split(mnist1d_small, "iid", 5, 5, seed=0, val_fraction=0.1)


def test_digits_load_and_image_shift() -> None:
    d = load_federated_data(DataConfig(dataset="digits", num_samples=1000), seed=0)
    assert d.input_shape == (1, 8, 8)
    assert 0.0 <= d.test.x.min() and d.test.x.max() <= 1.0
    x = np.zeros((4, 1, 8, 8), dtype=np.float32)
    shifted = shift_images(x, np.random.default_rng(0))
    assert shifted.shape == x.shape and shifted.dtype == np.float32
    assert shifted.max() > 0.0


def test_missing_mnist_folder_names_the_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from edgekd.core.data_files import DataFileError

    cfg = DataConfig(dataset="mnist", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataFileError, match="nowhere"):
        load_federated_data(cfg, seed=0)
