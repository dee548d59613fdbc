"""Corpus ingest on Dask: prompts in, attribution graphs in Neo4j and feature statistics in DuckDB out.

Modules: `prompts` (reading, normalising, identifying), `settings` (what identifies a run), `worker` (the per-worker
model plugin and the batch task that writes shards), `loader` (the single writer into both stores), `ledger`
(done/failed record for resuming), `pipeline` (`run_ingest`, behind `atlas ingest`), `demo_corpus` (the shipped
demo prompts). Depends on `atlas`; nothing in `atlas` imports this package (the command line, `atlas_cli`, sits
above both).
"""
