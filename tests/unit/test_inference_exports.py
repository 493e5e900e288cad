"""inference's public surface: complete __all__, a docstring mapping every module, one error tree."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

import inference
from overlay.errors import NodeError

MODULES = sorted(m.name for m in pkgutil.iter_modules(inference.__path__))


def test_package_exports_and_docstring() -> None:
    for name in inference.__all__:
        assert hasattr(inference, name), name
    assert len(set(inference.__all__)) == len(inference.__all__)
    for mod in MODULES:
        assert f"{mod}.py" in (inference.__doc__ or ""), f"{mod}.py missing from the package docstring"


@pytest.mark.parametrize("name", MODULES)
def test_module_all_is_complete_and_errors_are_in_the_tree(name: str) -> None:
    mod = importlib.import_module(f"inference.{name}")
    exported = set(getattr(mod, "__all__", ()))
    assert exported, f"inference.{name} has no __all__"
    for symbol in exported:
        assert hasattr(mod, symbol), f"inference.{name}.__all__ names a missing {symbol}"
    public = {
        n
        for n, obj in vars(mod).items()
        if not n.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == mod.__name__
    }
    assert public <= exported, f"inference.{name} does not export {sorted(public - exported)}"
    for obj in vars(mod).values():
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == mod.__name__:
            assert issubclass(obj, NodeError), obj


def test_light_modules_do_not_import_torch() -> None:
    """A client-only node (no cpu extra) imports messages, engine, service and models."""
    code = (
        "import sys, inference, inference.messages, inference.engine, inference.service, inference.models;"
        "bad = [m for m in ('torch', 'tokenizers', 'safetensors', 'gguf', 'exllamav2') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
