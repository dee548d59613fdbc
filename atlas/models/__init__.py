"""Model loading: the offline default, local directories, hub names and tiny test models."""

from atlas.models.loading import LoadedModel, ModelInfo, ModelLoadError, load_model

__all__ = ["LoadedModel", "ModelInfo", "ModelLoadError", "load_model"]
