"""Corpus- and weight-level analyses that sit on top of stored graphs and transcoder weights (global circuits)."""
