"""Model loading: the offline default, local directories, hub names and tiny test models.

The names below are imported on first use, so that `atlas.models.dimensions` (sizes and identity without loading a
model: no torch) can be imported without torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from atlas.models.dimensions import ModelLoadError
    from atlas.models.loading import LoadedModel, ModelInfo, load_model

__all__ = ["LoadedModel", "ModelInfo", "ModelLoadError", "load_model"]
_WHERE = {"LoadedModel": "loading", "ModelInfo": "loading", "load_model": "loading", "ModelLoadError": "dimensions"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
