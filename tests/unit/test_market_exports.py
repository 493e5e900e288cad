"""Every market module declares a complete, accurate ``__all__``; errors stay in the one tree."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import market
from overlay.errors import NodeError

MODULES = sorted(m.name for m in pkgutil.iter_modules(market.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_all_is_complete_and_exists(name: str) -> None:
    mod = importlib.import_module(f"market.{name}")
    exported = set(getattr(mod, "__all__", ()))
    assert exported, f"market.{name} has no __all__"
    for symbol in exported:
        assert hasattr(mod, symbol), f"market.{name}.__all__ names a missing {symbol}"
    public = {
        n
        for n, obj in vars(mod).items()
        if not n.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == mod.__name__
    }
    assert public <= exported, f"market.{name} does not export {sorted(public - exported)}"


@pytest.mark.parametrize("name", MODULES)
def test_exceptions_derive_from_the_tree(name: str) -> None:
    mod = importlib.import_module(f"market.{name}")
    for obj in vars(mod).values():
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == mod.__name__:
            assert issubclass(obj, NodeError), obj
