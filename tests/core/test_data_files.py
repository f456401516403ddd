"""Tests for edgekd.core.data_files against small files written in the real formats."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from edgekd.core.data_files import (
    CLASS_NAMES,
    DataFileError,
    load_cifar10_folder,
    load_idx_folder,
    read_idx,
)

IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_NAMES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")

_TYPE_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode ``array`` as the IDX format does: magic, big-endian dims, big-endian data."""
    kind = f"{array.dtype.kind}{array.dtype.itemsize}"
    header = bytes([0, 0, _TYPE_CODES[kind], array.ndim])
    dims = struct.pack(f">{array.ndim}I", *array.shape)
    return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> None:
    payload = idx_bytes(array)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist_folder(
    folder: Path, *, gz: bool, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Write 5 train and 3 test 28x28 images; returns the raw uint8 images and labels."""
    rng = np.random.default_rng(seed)
    train_x = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    test_x = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    # Pin both extremes so the scaling is checked at 0 and exactly 1.
    train_x[0, 0, 0] = 0
    train_x[0, 0, 1] = 255
    train_y = np.array([5, 0, 4, 1, 9], dtype=np.uint8)
    test_y = np.array([7, 2, 1], dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for name, array in zip(IDX_NAMES, (train_x, train_y, test_x, test_y), strict=True):
        write_idx(folder / f"{name}{suffix}", array)
    return train_x, train_y, test_x, test_y


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    # Protocol 2 with bytes keys matches the official Python 2 era files.
    batch = {b"batch_label": b"test batch", b"labels": labels, b"data": data}
    with path.open("wb") as handle:
        pickle.dump(batch, handle, protocol=2)


def write_cifar_folder(folder: Path) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """Write 5 training batches of 2 images and a test batch of 2 images."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    train_data = rng.integers(0, 256, size=(10, 3072), dtype=np.uint8)
    train_labels = [3, 8, 0, 9, 1, 2, 4, 5, 6, 7]
    for index, name in enumerate(CIFAR_NAMES):
        rows = slice(2 * index, 2 * index + 2)
        write_cifar_batch(folder / name, train_data[rows], train_labels[rows])
    test_data = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
    test_labels = [6, 1]
    write_cifar_batch(folder / "test_batch", test_data, test_labels)
    return train_data, train_labels, test_data, test_labels


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_load_idx_folder_returns_scaled_nchw_images_and_labels(
    tmp_path: Path, gz: bool, name: str
) -> None:
    # Prepare
    train_x, _, test_x, _ = write_mnist_folder(tmp_path / name, gz=gz)

    # Execute
    x_train, y_train, x_test, y_test = load_idx_folder(tmp_path / name, name)

    # Assert
    assert x_train.shape == (5, 1, 28, 28)
    assert x_train.dtype == np.float32
    assert x_test.shape == (3, 1, 28, 28)
    assert x_test.dtype == np.float32
    assert y_train.dtype == np.int64
    assert y_test.dtype == np.int64
    np.testing.assert_array_equal(y_train, [5, 0, 4, 1, 9])
    np.testing.assert_array_equal(y_test, [7, 2, 1])
    np.testing.assert_array_equal(x_train[:, 0], train_x.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(x_test[:, 0], test_x.astype(np.float32) / np.float32(255))
    assert x_train[0, 0, 0, 0] == 0.0
    assert x_train[0, 0, 0, 1] == 1.0
    assert x_train[1, 0, 3, 4] == np.float32(train_x[1, 3, 4]) / np.float32(255)


def test_load_idx_folder_accepts_a_mix_of_raw_and_gz_files(tmp_path: Path) -> None:
    # Prepare
    train_x, _, _, _ = write_mnist_folder(tmp_path, gz=False)
    raw = tmp_path / "t10k-images-idx3-ubyte"
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(raw.read_bytes())
    raw.unlink()

    # Execute
    x_train, _, x_test, _ = load_idx_folder(str(tmp_path), "mnist")

    # Assert
    assert x_test.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(x_train[:, 0], train_x / np.float32(255))


@pytest.mark.parametrize(
    "array",
    [
        np.arange(-6, 6, dtype=np.int8).reshape(3, 4),
        np.array([[1, -2, 30000], [-30000, 0, 7]], dtype=np.int16),
        np.array([2**31 - 1, -(2**31), 123456789], dtype=np.int32),
        np.array([[0.5, -1.25], [3.0e10, 1e-7]], dtype=np.float32),
        np.array([np.pi, -np.e, 1e300], dtype=np.float64),
    ],
    ids=["byte", "short", "int", "float", "double"],
)
def test_read_idx_decodes_every_type_code_big_endian(tmp_path: Path, array: np.ndarray) -> None:
    # Prepare
    path = tmp_path / "values.idx"
    write_idx(path, array)

    # Execute
    decoded = read_idx(path)

    # Assert
    assert decoded.shape == array.shape
    assert decoded.dtype == array.dtype
    assert decoded.dtype.isnative
    np.testing.assert_array_equal(decoded, array)
    decoded[...] = 0  # the result is a private, writable copy


def test_read_idx_reports_truncated_data(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((5, 28, 28), dtype=np.uint8))[:-1])

    # Execute
    with pytest.raises(DataFileError) as info:
        read_idx(path)

    # Assert
    message = str(info.value)
    assert str(path) in message
    assert "truncated data" in message
    assert "3920" in message
    assert "3919" in message


def test_read_idx_reports_trailing_bytes(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)) + b"\x00")

    # Execute / Assert
    with pytest.raises(DataFileError, match="trailing bytes"):
        read_idx(path)


def test_read_idx_reports_truncated_header(tmp_path: Path) -> None:
    # Prepare: a 3-D header needs 16 bytes; give it 10.
    path = tmp_path / "images"
    path.write_bytes(idx_bytes(np.zeros((1, 2, 2), dtype=np.uint8))[:10])

    # Execute / Assert
    with pytest.raises(DataFileError, match="truncated header"):
        read_idx(path)


@pytest.mark.parametrize(
    "header",
    [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"\x1f\x8b\x08\x00"],
    ids=["nonzero-lead", "unknown-type", "gzip-without-gz-suffix"],
)
def test_read_idx_reports_bad_magic(tmp_path: Path, header: bytes) -> None:
    # Prepare
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(header + struct.pack(">I", 2) + b"\x01\x02")

    # Execute
    with pytest.raises(DataFileError) as info:
        read_idx(path)

    # Assert
    message = str(info.value)
    assert "bad magic number" in message
    assert f"0x{header.hex()}" in message
    assert str(path) in message
    assert ("add a .gz suffix" in message) == header.startswith(b"\x1f\x8b")


def test_read_idx_reports_a_gz_file_that_is_not_gzip(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)))

    # Execute / Assert
    with pytest.raises(DataFileError, match="not a valid gzip stream"):
        read_idx(path)


def test_read_idx_reports_a_missing_file(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(DataFileError, match="missing file"):
        read_idx(tmp_path / "nothing-here")


def test_load_idx_folder_names_the_missing_folder(tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "no-such-folder"

    # Execute
    with pytest.raises(DataFileError) as info:
        load_idx_folder(folder, "fashion-mnist")

    # Assert
    message = str(info.value)
    assert message.startswith(f"fashion-mnist: folder {folder} does not exist")
    assert all(name in message for name in IDX_NAMES)
    assert "\n" not in message


def test_load_idx_folder_rejects_a_file_in_place_of_the_folder(tmp_path: Path) -> None:
    # Prepare
    not_a_folder = tmp_path / "mnist.zip"
    not_a_folder.write_bytes(b"PK")

    # Execute / Assert
    with pytest.raises(DataFileError, match="is not a folder"):
        load_idx_folder(not_a_folder, "mnist")


@pytest.mark.parametrize("missing", IDX_NAMES)
def test_load_idx_folder_names_the_missing_file_on_one_line(tmp_path: Path, missing: str) -> None:
    # Prepare
    write_mnist_folder(tmp_path, gz=True)
    (tmp_path / f"{missing}.gz").unlink()

    # Execute
    with pytest.raises(DataFileError) as info:
        load_idx_folder(tmp_path, "mnist")

    # Assert
    message = str(info.value)
    assert message == (
        f"mnist: missing file {tmp_path / missing} (expected train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, "
        "optionally .gz)"
    )
    assert len(message.splitlines()) == 1


def test_load_idx_folder_prefixes_corrupt_file_errors_with_the_dataset(tmp_path: Path) -> None:
    # Prepare
    write_mnist_folder(tmp_path, gz=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-2])

    # Execute
    with pytest.raises(DataFileError) as info:
        load_idx_folder(tmp_path, "fashion-mnist")

    # Assert
    message = str(info.value)
    assert message.startswith(f"fashion-mnist: corrupt IDX file {labels}: truncated data")
    assert "\n" not in message


def test_load_idx_folder_rejects_images_of_the_wrong_size(tmp_path: Path) -> None:
    # Prepare: a CIFAR-sized tensor under an MNIST name
    write_mnist_folder(tmp_path, gz=False)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 32, 32), dtype=np.uint8))

    # Execute / Assert
    with pytest.raises(DataFileError, match=r"shape \(5, 32, 32\).*expected \(N, 28, 28\)"):
        load_idx_folder(tmp_path, "mnist")


def test_load_idx_folder_rejects_label_count_mismatch(tmp_path: Path) -> None:
    # Prepare
    write_mnist_folder(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))

    # Execute / Assert
    with pytest.raises(DataFileError, match=r"labels have shape \(4,\), expected \(5,\)"):
        load_idx_folder(tmp_path, "mnist")


def test_load_idx_folder_rejects_labels_outside_ten_classes(tmp_path: Path) -> None:
    # Prepare
    write_mnist_folder(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 10, 2], dtype=np.uint8))

    # Execute / Assert
    with pytest.raises(DataFileError, match=r"labels span 1\.\.10, expected 0\.\.9"):
        load_idx_folder(tmp_path, "mnist")


def test_load_idx_folder_rejects_an_unknown_dataset_name(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="unknown IDX dataset 'cifar10'") as info:
        load_idx_folder(tmp_path, "cifar10")
    assert not isinstance(info.value, DataFileError)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "cifar-10-batches-py"])
def test_load_cifar10_folder_returns_nchw_planes_scaled(tmp_path: Path, nested: bool) -> None:
    # Prepare
    batches = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    train_data, train_labels, test_data, test_labels = write_cifar_folder(batches)

    # Execute
    x_train, y_train, x_test, y_test = load_cifar10_folder(tmp_path)

    # Assert
    assert x_train.shape == (10, 3, 32, 32)
    assert x_train.dtype == np.float32
    assert x_test.shape == (2, 3, 32, 32)
    assert x_test.dtype == np.float32
    assert y_train.dtype == np.int64
    assert y_test.dtype == np.int64
    np.testing.assert_array_equal(y_train, train_labels)
    np.testing.assert_array_equal(y_test, test_labels)
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each 32x32 row-major.
    image, channel, row, column = 7, 1, 5, 30
    flat = train_data[image, channel * 1024 + row * 32 + column]
    assert x_train[image, channel, row, column] == np.float32(flat) / np.float32(255)
    assert x_test[1, 2, 31, 31] == np.float32(test_data[1, 3071]) / np.float32(255)
    np.testing.assert_array_equal(
        x_train.reshape(10, 3072), train_data.astype(np.float32) / np.float32(255)
    )
    assert x_train.min() >= 0.0
    assert x_train.max() <= 1.0


def test_load_cifar10_folder_keeps_the_batch_order(tmp_path: Path) -> None:
    # Prepare: each training batch's two images are constant at the batch number.
    for number, name in enumerate(CIFAR_NAMES, start=1):
        write_cifar_batch(tmp_path / name, np.full((2, 3072), number, dtype=np.uint8), [0, 1])
    write_cifar_batch(tmp_path / "test_batch", np.zeros((1, 3072), dtype=np.uint8), [9])

    # Execute
    x_train, _, x_test, y_test = load_cifar10_folder(str(tmp_path))

    # Assert
    per_image = x_train.reshape(10, -1).max(axis=1) * 255
    np.testing.assert_allclose(per_image, [1, 1, 2, 2, 3, 3, 4, 4, 5, 5], rtol=1e-6)
    assert x_test.shape == (1, 3, 32, 32)
    np.testing.assert_array_equal(y_test, [9])


def test_load_cifar10_folder_names_the_missing_folder(tmp_path: Path) -> None:
    # Execute
    with pytest.raises(DataFileError) as info:
        load_cifar10_folder(tmp_path / "cifar")

    # Assert
    message = str(info.value)
    assert message.startswith(f"cifar10: folder {tmp_path / 'cifar'} does not exist")
    assert "data_batch_1" in message
    assert "test_batch" in message
    assert "\n" not in message


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "cifar-10-batches-py"])
def test_load_cifar10_folder_names_the_missing_batch(tmp_path: Path, nested: bool) -> None:
    # Prepare
    batches = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    write_cifar_folder(batches)
    (batches / "data_batch_3").unlink()

    # Execute
    with pytest.raises(DataFileError) as info:
        load_cifar10_folder(tmp_path)

    # Assert
    message = str(info.value)
    assert message.startswith(f"cifar10: missing file {batches / 'data_batch_3'} (expected ")
    for name in (*CIFAR_NAMES, "test_batch", "cifar-10-batches-py"):
        assert name in message
    assert len(message.splitlines()) == 1


def test_load_cifar10_folder_hints_at_an_unextracted_archive(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b")

    # Execute / Assert
    with pytest.raises(DataFileError, match=r"cifar-10-python\.tar\.gz, extract it first"):
        load_cifar10_folder(tmp_path)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"not a pickle at all", "not a readable pickle"),
        (pickle.dumps([1, 2, 3], protocol=2), "pickle holds list"),
        (pickle.dumps({b"pixels": b""}, protocol=2), "expected b'data' and b'labels'"),
        (
            pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2),
            r"shape \(2, 100\) of uint8, expected \(N, 3072\)",
        ),
        (
            pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, protocol=2),
            r"labels have shape \(1,\), expected \(2,\)",
        ),
    ],
    ids=["garbage", "list", "wrong-keys", "wrong-width", "label-count"],
)
def test_load_cifar10_folder_reports_a_corrupt_batch(
    tmp_path: Path, payload: bytes, problem: str
) -> None:
    # Prepare
    write_cifar_folder(tmp_path)
    (tmp_path / "test_batch").write_bytes(payload)

    # Execute
    with pytest.raises(DataFileError, match=problem) as info:
        load_cifar10_folder(tmp_path)

    # Assert
    message = str(info.value)
    assert message.startswith(f"cifar10: corrupt file {tmp_path / 'test_batch'}: ")
    assert "\n" not in message


def test_load_cifar10_folder_reports_a_truncated_pickle(tmp_path: Path) -> None:
    # Prepare
    write_cifar_folder(tmp_path)
    batch = tmp_path / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:100])

    # Execute / Assert
    with pytest.raises(DataFileError, match="data_batch_2: not a readable pickle"):
        load_cifar10_folder(tmp_path)


def test_data_file_error_flattens_newlines_into_one_line() -> None:
    # Execute
    error = DataFileError("mnist: missing file /odd\npath/x")

    # Assert
    assert str(error) == "mnist: missing file /odd path/x"
    assert isinstance(error, ValueError)


def test_class_names_cover_ten_classes_per_dataset() -> None:
    # Assert
    assert set(CLASS_NAMES) == {"mnist", "fashion-mnist", "cifar10"}
    assert all(len(names) == 10 for names in CLASS_NAMES.values())
    assert CLASS_NAMES["mnist"][7] == "7"
    assert CLASS_NAMES["fashion-mnist"][0] == "T-shirt/top"
    assert CLASS_NAMES["fashion-mnist"][9] == "Ankle boot"
    assert CLASS_NAMES["cifar10"][1] == "automobile"
    assert CLASS_NAMES["cifar10"][9] == "truck"
