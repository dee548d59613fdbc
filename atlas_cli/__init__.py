"""The `atlas` command line, the top of the stack: it drives `atlas` (models, transcoders, attribution, storage),
`ingest` and `app`, and nothing below imports it.

Modules, one per stage they drive: `common` (console, user-error handling, option bounds), `core` (models, corpora,
training, transcoders, attribution, the managed Neo4j server), `ingest_commands` (ingest and the demo),
`query_commands` (the cross-prompt path query), `app_command` (the Streamlit app); `main` assembles them into the
`atlas` Typer app. Heavy libraries (torch, transformers, dask) are imported inside commands so `atlas --help` and
argument errors stay instant.
"""
