"""Transcoder training: corpora, activation streaming, objectives, the trainer and spliced evaluation."""
