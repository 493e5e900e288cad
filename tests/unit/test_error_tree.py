"""The error tree drawn in ``overlay/errors.py``'s docstring is the tree of its classes, and no
module of the project raises an exception class outside it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from overlay import errors
from overlay.errors import NodeError


def drawn_tree() -> dict[str, str | None]:
    """class name -> parent name, as the docstring draws it."""
    doc = errors.__doc__ or ""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        rest = line.lstrip(" │├└─")
        name = rest.split(" ", 1)[0]
        if not line.startswith("    ") or name not in vars(errors):
            continue
        depth = len(line) - len(rest)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[name] = stack[-1][1] if stack else None
        stack.append((depth, name))
    return parents


def test_the_docstring_draws_every_class_under_its_real_parent() -> None:
    real = {
        name: (None if cls is NodeError else cls.__bases__[0].__name__)
        for name, cls in vars(errors).items()
        if inspect.isclass(cls) and issubclass(cls, NodeError)
    }
    assert drawn_tree() == real
    assert sorted(errors.__all__) == sorted(real)


PACKAGES = ("overlay", "ton", "node")


@pytest.mark.parametrize("package", PACKAGES)
def test_no_exception_class_escapes_the_tree(package: str) -> None:
    pkg = importlib.import_module(package)
    for info in pkgutil.walk_packages(pkg.__path__, package + "."):
        mod = importlib.import_module(info.name)
        for obj in vars(mod).values():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == mod.__name__:
                assert issubclass(obj, NodeError), f"{mod.__name__}.{obj.__name__}"
