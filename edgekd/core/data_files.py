"""Loaders for image datasets that the user keeps in a local folder.

Nothing here downloads anything: the user points ``edgekd`` at a folder holding the
official files, and a missing or damaged file raises :class:`DataFileError` whose
one-line message names the path and the file names that were expected.

Formats
-------
* MNIST and Fashion-MNIST: the IDX files of LeCun et al. (http://yann.lecun.com/exdb/mnist/)
  and Xiao et al. 2017 (https://github.com/zalandoresearch/fashion-mnist), raw or ``.gz``.
* CIFAR-10: the "python version" pickle batches of Krizhevsky 2009
  (https://www.cs.toronto.edu/~kriz/cifar.html).

This module depends on numpy only, so the deploy side can use it without torch or flwr.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from pathlib import Path
from typing import Any, Final

import numpy as np

from edgekd.core.errors import EdgeKDError

__all__ = [
    "CIFAR10_FILES",
    "CLASS_NAMES",
    "IDX_FILES",
    "DataFileError",
    "load_cifar10_folder",
    "load_idx_folder",
    "read_idx",
]

CLASS_NAMES: Final[dict[str, list[str]]] = {
    "mnist": [str(digit) for digit in range(10)],
    "fashion-mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
    "cifar10": [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ],
}

IDX_FILES: Final[tuple[str, str, str, str]] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_FILES: Final[tuple[str, ...]] = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
)
# The official archive unpacks into this folder; users point at either level.
CIFAR10_SUBFOLDER: Final = "cifar-10-batches-py"
CIFAR10_ARCHIVE: Final = "cifar-10-python.tar.gz"

_IDX_DATASETS: Final = frozenset({"mnist", "fashion-mnist"})
_NUM_CLASSES: Final = 10
_MNIST_SIDE: Final = 28
_CIFAR_SIDE: Final = 32
_CIFAR_CHANNELS: Final = 3

# IDX type codes -> big-endian numpy dtypes (format spec on the MNIST page).
_IDX_DTYPES: Final[dict[int, np.dtype[Any]]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_IDX_EXPECTED: Final = ", ".join(IDX_FILES) + ", optionally .gz"
_CIFAR_EXPECTED: Final = ", ".join(CIFAR10_FILES)


class DataFileError(EdgeKDError, ValueError):
    """A dataset folder or file is missing or unreadable; the message is one line."""

    def __init__(self, message: str) -> None:
        # Callers log this into a single report line and CLIs print it as-is, so a
        # path holding a newline must not split it.
        super().__init__(" ".join(message.splitlines()))


def _open_maybe_gzip(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except FileNotFoundError as err:
        raise DataFileError(f"missing file {path}") from err
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataFileError(f"corrupt file {path}: not a valid gzip stream ({err})") from err
    except OSError as err:
        raise DataFileError(f"cannot read file {path}: {err.strerror or err}") from err


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (raw, or gzip-compressed when the name ends in ``.gz``).

    Layout: two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int,
    0x0D float, 0x0E double), the number of dimensions, that many big-endian uint32
    sizes, then the data in big-endian C order.

    Returns:
        A freshly allocated, writable array in native byte order with the stored shape.

    Raises:
        DataFileError: the file is missing, the magic number is wrong, or the data
            length does not match the sizes in the header.
    """
    path = Path(path)
    raw = _open_maybe_gzip(path)
    if len(raw) < 4:
        raise DataFileError(f"corrupt IDX file {path}: {len(raw)} bytes, shorter than the header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        # Browsers sometimes save the .gz download under the bare name.
        hint = "; it looks gzip-compressed, add a .gz suffix" if raw[:2] == b"\x1f\x8b" else ""
        raise DataFileError(
            f"corrupt IDX file {path}: bad magic number 0x{raw[:4].hex()} "
            f"(expected 0x0000 followed by a type code 08/09/0B/0C/0D/0E and ndim){hint}"
        )
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataFileError(
            f"corrupt IDX file {path}: truncated header, {ndim} dimensions need "
            f"{header_len} bytes but the file has {len(raw)}"
        )
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        problem = "truncated data" if actual < expected else "trailing bytes after the data"
        raise DataFileError(
            f"corrupt IDX file {path}: {problem}, shape {shape} of {dtype.name} needs "
            f"{expected} data bytes but found {actual}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    # frombuffer views the read-only bytes; astype both copies and fixes byte order.
    return data.astype(dtype.newbyteorder("="))


def _require_folder(folder: Path, name: str, expected: str) -> None:
    if not folder.exists():
        raise DataFileError(f"{name}: folder {folder} does not exist (expected {expected})")
    if not folder.is_dir():
        raise DataFileError(f"{name}: {folder} is not a folder (expected {expected})")


def _find_idx_file(folder: Path, base: str, name: str) -> Path:
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    raise DataFileError(f"{name}: missing file {folder / base} (expected {_IDX_EXPECTED})")


def _check_labels(labels: np.ndarray, count: int, source: Path, name: str) -> np.ndarray:
    if labels.ndim != 1 or labels.shape[0] != count:
        raise DataFileError(
            f"{name}: corrupt file {source}: labels have shape {labels.shape}, "
            f"expected ({count},) to match the images"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= _NUM_CLASSES):
        raise DataFileError(
            f"{name}: corrupt file {source}: labels span {labels.min()}..{labels.max()}, "
            f"expected 0..{_NUM_CLASSES - 1}"
        )
    return labels.astype(np.int64)


def _load_idx_split(
    folder: Path, images_base: str, labels_base: str, name: str
) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find_idx_file(folder, images_base, name)
    labels_path = _find_idx_file(folder, labels_base, name)
    try:
        images = read_idx(images_path)
        labels = read_idx(labels_path)
    except DataFileError as err:
        raise DataFileError(f"{name}: {err}") from err
    expected_shape = (_MNIST_SIDE, _MNIST_SIDE)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != expected_shape:
        raise DataFileError(
            f"{name}: corrupt file {images_path}: images have shape {images.shape} of "
            f"{images.dtype}, expected (N, 28, 28) of uint8"
        )
    y = _check_labels(labels, images.shape[0], labels_path, name)
    x = images.astype(np.float32)[:, np.newaxis, :, :] / np.float32(255.0)
    return x, y


def load_idx_folder(
    folder: str | Path, name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load MNIST or Fashion-MNIST from the four IDX files in ``folder``.

    Both datasets use the same file names (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``),
    each either raw or with a ``.gz`` suffix; the raw file wins when both exist.

    Args:
        folder: the folder holding the files.
        name: ``"mnist"`` or ``"fashion-mnist"``; used for the error messages.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images float32 ``(N, 1, 28, 28)``
        scaled to ``[0, 1]`` by ``/ 255``, labels int64 ``(N,)`` in ``0..9``.

    Raises:
        ValueError: ``name`` is not an IDX dataset.
        DataFileError: the folder or a file is missing, or a file is corrupt.
    """
    if name not in _IDX_DATASETS:
        raise ValueError(f"unknown IDX dataset {name!r}, expected one of {sorted(_IDX_DATASETS)}")
    root = Path(folder)
    _require_folder(root, name, _IDX_EXPECTED)
    train_images, train_labels, test_images, test_labels = IDX_FILES
    x_train, y_train = _load_idx_split(root, train_images, train_labels, name)
    x_test, y_test = _load_idx_split(root, test_images, test_labels, name)
    return x_train, y_train, x_test, y_test


def _cifar_root(folder: Path) -> Path:
    """Pick ``folder`` or its ``cifar-10-batches-py/`` child, whichever holds the batches."""
    candidates = (folder, folder / CIFAR10_SUBFOLDER)
    for candidate in candidates:
        if all((candidate / base).is_file() for base in CIFAR10_FILES):
            return candidate
    # Neither is complete: report against the one the user evidently meant.
    for candidate in candidates:
        if any((candidate / base).is_file() for base in CIFAR10_FILES):
            return candidate
    return folder


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as handle:
            # The official files are Python 2 pickles; encoding="bytes" keeps their str
            # keys as bytes instead of guessing a text encoding.
            batch = pickle.load(handle, encoding="bytes")
    except OSError as err:
        raise DataFileError(f"cifar10: cannot read file {path}: {err.strerror or err}") from err
    # A damaged pickle can raise nearly any exception type, so catch them all here.
    except Exception as err:
        raise DataFileError(
            f"cifar10: corrupt file {path}: not a readable pickle ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(batch, dict):
        raise DataFileError(
            f"cifar10: corrupt file {path}: pickle holds {type(batch).__name__}, "
            "expected a dict with keys b'data' and b'labels'"
        )
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        keys = ", ".join(repr(key) for key in batch)
        raise DataFileError(
            f"cifar10: corrupt file {path}: keys [{keys}], expected b'data' and b'labels'"
        )
    pixels_per_image = _CIFAR_CHANNELS * _CIFAR_SIDE * _CIFAR_SIDE
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels_per_image:
        raise DataFileError(
            f"cifar10: corrupt file {path}: b'data' has shape {data.shape} of {data.dtype}, "
            f"expected (N, {pixels_per_image}) of uint8"
        )
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise DataFileError(
            f"cifar10: corrupt file {path}: b'labels' is not a list of ints ({err})"
        ) from err
    y = _check_labels(label_array, data.shape[0], path, "cifar10")
    return data, y


def _load_cifar_batches(root: Path, bases: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    parts = [_read_cifar_batch(root / base) for base in bases]
    data = np.concatenate([pixels for pixels, _ in parts])
    y = np.concatenate([labels for _, labels in parts])
    # Rows hold the R, G and B planes one after another, each 32x32 row-major, so a
    # plain C-order reshape yields NCHW.
    x = data.reshape(-1, _CIFAR_CHANNELS, _CIFAR_SIDE, _CIFAR_SIDE).astype(np.float32)
    return x / np.float32(255.0), y


def load_cifar10_folder(
    folder: str | Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load CIFAR-10 from the "python version" pickle batches in ``folder``.

    The six files ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` may lie in
    ``folder`` itself or in its ``cifar-10-batches-py/`` subfolder (as the official
    archive unpacks). Each is a pickle of a dict with ``b"data"`` (uint8, ``N x 3072``:
    the R, G, B planes of a 32x32 image, each row-major) and ``b"labels"`` (ints).

    Security: unpickling runs code chosen by whoever wrote the file. Pickle is the
    official CIFAR-10 format, so only point this at files from a source you trust.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images float32 ``(N, 3, 32, 32)``
        scaled to ``[0, 1]`` by ``/ 255``, labels int64 ``(N,)`` in ``0..9``.

    Raises:
        DataFileError: the folder or a batch is missing, or a batch is corrupt.
    """
    base = Path(folder)
    expected = f"{_CIFAR_EXPECTED} in {base} or {base / CIFAR10_SUBFOLDER}"
    _require_folder(base, "cifar10", expected)
    root = _cifar_root(base)
    for name in CIFAR10_FILES:
        if not (root / name).is_file():
            hint = ""
            if (base / CIFAR10_ARCHIVE).is_file():
                hint = f"; found {base / CIFAR10_ARCHIVE}, extract it first"
            raise DataFileError(f"cifar10: missing file {root / name} (expected {expected}){hint}")
    x_train, y_train = _load_cifar_batches(root, CIFAR10_FILES[:-1])
    x_test, y_test = _load_cifar_batches(root, CIFAR10_FILES[-1:])
    return x_train, y_train, x_test, y_test
