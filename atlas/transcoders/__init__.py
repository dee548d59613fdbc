"""Transcoders: per-layer (PLT) and cross-layer (CLT) sets behind one `Transcoder` protocol, and their formats."""

from atlas.transcoders.activations import ActivationConfig
from atlas.transcoders.base import Transcoder, TranscoderOutput, TranscoderShapeError, TranscoderSpec
from atlas.transcoders.cross_layer import CrossLayerTranscoder
from atlas.transcoders.identity import TranscoderIdentity, legacy_transcoder_identity, transcoder_identity
from atlas.transcoders.io import (
    TranscoderFormatError,
    build_transcoder,
    check_compatible,
    load_transcoder,
    read_metadata,
    read_spec,
    save_transcoder,
)
from atlas.transcoders.per_layer import PerLayerTranscoder

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
