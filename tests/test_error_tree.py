"""One exception tree: every exception class the product defines derives from
common.errors.Error, as a `DfError` (wire code, exit code) or a `Signal` (control flow
inside one process), and wire codes name one class each."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from common import errors

PACKAGES = ("common", "supernode", "dfget", "dfdaemon")


def _modules() -> list[str]:
    names: list[str] = []
    for pkg in PACKAGES:
        mod = importlib.import_module(pkg)
        names.append(pkg)
        for info in pkgutil.walk_packages(mod.__path__, prefix=f"{pkg}."):
            if info.name.endswith("__main__"):
                continue
            names.append(info.name)
    return names


def _exception_classes() -> list[type[BaseException]]:
    found = []
    for name in _modules():
        mod = importlib.import_module(name)
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == name:
                found.append(obj)
    return found


def test_every_product_exception_is_in_the_tree() -> None:
    classes = _exception_classes()
    assert len(classes) > 30  # the walk found the product's classes, not an empty list
    outside = [f"{c.__module__}.{c.__qualname__}" for c in classes if not issubclass(c, errors.Error)]
    assert outside == []


def test_signals_are_not_wire_errors() -> None:
    for cls in _exception_classes():
        if issubclass(cls, errors.Signal):
            assert not issubclass(cls, errors.DfError), cls


# the wire's classes: those of common/errors.py (whatever other test modules imported)
WIRE = [c for c in [errors.DfError, *errors._all_subclasses(errors.DfError)] if c.__module__ == "common.errors"]


@pytest.mark.parametrize("cls", WIRE)
def test_from_wire_rebuilds_the_class_that_owns_the_code(cls: type[errors.DfError]) -> None:
    owner = errors.BY_CODE[cls.code]
    assert issubclass(cls, owner)
    rebuilt = errors.from_wire({"error": cls.code, "message": "m"})
    assert type(rebuilt) is owner and rebuilt.message == "m"
