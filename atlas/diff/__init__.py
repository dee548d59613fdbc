"""Model and dictionary diffing: align the features of two dictionaries, diff their attribution graphs on shared
prompts, and test whether a difference exceeds the noise floor of two dictionaries of one model.

An analysis stage: it may import models, transcoders, attribution, validation and storage; never ingest, app or the
CLI."""
