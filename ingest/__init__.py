"""Corpus ingest workers and pipelines (Dask). Not built yet: see the roadmap in README.md."""
