"""node.tee's public surface: __all__ is complete and the package docstring maps every module."""

from __future__ import annotations

import importlib
import pkgutil

import attrs

import node.tee
from overlay import wire


def test_all_names_exist_and_modules_are_mapped() -> None:
    for name in node.tee.__all__:
        assert hasattr(node.tee, name), name
    assert len(set(node.tee.__all__)) == len(node.tee.__all__)
    doc = node.tee.__doc__ or ""
    for mod in pkgutil.iter_modules(node.tee.__path__):
        assert f"{mod.name}.py" in doc, f"{mod.name}.py missing from the package docstring"
        module = importlib.import_module(f"node.tee.{mod.name}")
        for name in getattr(module, "__all__", ()):
            assert hasattr(module, name), f"{mod.name}.{name}"


def test_messages_use_the_confidential_compute_tag_range() -> None:
    ours = {tag: cls for tag, cls in wire.registered().items() if cls.__module__ == "node.tee.messages"}
    assert ours
    assert all(300 <= tag <= 399 for tag in ours)
    for cls in ours.values():
        assert attrs.has(cls)
