"""`python -m atlas_cli ...` runs the `atlas` command."""

from atlas_cli.main import app

app()
