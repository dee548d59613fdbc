"""Transcoders: per-layer (PLT) and cross-layer (CLT) sets behind one `Transcoder` protocol, and their formats.

The names below are imported on first use, so that `atlas.transcoders.checks` (a directory's config and headers
checked against a model, no weights loaded) can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from atlas.transcoders.activations import ActivationConfig
    from atlas.transcoders.base import Transcoder, TranscoderOutput, TranscoderShapeError, TranscoderSpec
    from atlas.transcoders.checks import TranscoderFormatError, read_metadata
    from atlas.transcoders.cross_layer import CrossLayerTranscoder
    from atlas.transcoders.identity import TranscoderIdentity, legacy_transcoder_identity, transcoder_identity
    from atlas.transcoders.io import build_transcoder, check_compatible, load_transcoder, read_spec, save_transcoder
    from atlas.transcoders.per_layer import PerLayerTranscoder

_WHERE = {
    "ActivationConfig": "activations",
    "CrossLayerTranscoder": "cross_layer",
    "PerLayerTranscoder": "per_layer",
    "Transcoder": "base",
    "TranscoderFormatError": "checks",
    "TranscoderOutput": "base",
    "TranscoderShapeError": "base",
    "TranscoderSpec": "base",
    "TranscoderIdentity": "identity",
    "legacy_transcoder_identity": "identity",
    "transcoder_identity": "identity",
    "read_spec": "io",
    "build_transcoder": "io",
    "check_compatible": "io",
    "load_transcoder": "io",
    "read_metadata": "checks",
    "save_transcoder": "io",
}
__all__ = [
    "ActivationConfig",
    "CrossLayerTranscoder",
    "PerLayerTranscoder",
    "Transcoder",
    "TranscoderFormatError",
    "TranscoderIdentity",
    "TranscoderOutput",
    "TranscoderShapeError",
    "TranscoderSpec",
    "build_transcoder",
    "check_compatible",
    "legacy_transcoder_identity",
    "load_transcoder",
    "read_metadata",
    "read_spec",
    "save_transcoder",
    "transcoder_identity",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
