"""The root `atlas` Typer app: global options, and every command group registered by the module of its stage."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from atlas_cli import (
    app_command,
    core,
    diff_commands,
    edit_command,
    global_commands,
    ingest_commands,
    label_commands,
    query_commands,
    validate_command,
)

app = typer.Typer(help="circuit-atlas: attribution graphs of language models at corpus scale.", no_args_is_help=True)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every phase.")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")


for stage in (
    core,
    ingest_commands,
    query_commands,
    validate_command,
    edit_command,
    global_commands,
    diff_commands,
    label_commands,
    app_command,
):
    stage.register(app)


if __name__ == "__main__":
    sys.exit(app())
