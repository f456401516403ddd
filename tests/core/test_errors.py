"""One error base: every exception class edgekd defines derives from EdgeKDError, so
the CLI turns any of them into one line and exit 2."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import edgekd
from edgekd.core.errors import EdgeKDError


def _edgekd_exception_classes() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(edgekd.__path__, prefix="edgekd."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == info.name:
                found.append(obj)
    return found


def test_every_edgekd_exception_is_an_edgekd_error() -> None:
    classes = _edgekd_exception_classes()

    assert len(classes) >= 19  # the walk found them (PayloadError, BundleError, ...)
    strays = [f"{c.__module__}.{c.__name__}" for c in classes if not issubclass(c, EdgeKDError)]
    assert strays == []


def test_each_keeps_the_builtin_it_refines() -> None:
    from edgekd.core.config import ConfigError
    from edgekd.deploy.tflite_export import LiteRTUnavailableError
    from edgekd.wire.payload import PayloadError

    assert issubclass(ConfigError, ValueError) and issubclass(PayloadError, ValueError)
    assert issubclass(LiteRTUnavailableError, ImportError)
