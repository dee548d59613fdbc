"""The checks an ingest makes before it reads at length, starts or creates anything: milliseconds, no heavy import.

`check_inputs` refuses a missing corpus file, and a transcoder directory that is corrupt (config, weight-file
headers) or does not fit the model (layer count, width, the model it records being trained on;
`atlas.transcoders.checks`), each with one message naming the file or both models. `run_ingest` calls it first;
the command line calls it before importing the pipeline (torch, Dask, the store drivers: seconds), so these errors
come back at once.
"""

from __future__ import annotations

from pathlib import Path

from atlas.models.dimensions import ModelLoadError
from atlas.training.corpus import CorpusError
from atlas.transcoders.checks import TranscoderFormatError, TranscoderHeader, check_transcoders_fit

# What `check_inputs` raises; each carries a message meant for the user.
INPUT_ERRORS: tuple[type[Exception], ...] = (CorpusError, TranscoderFormatError, ModelLoadError)


def check_inputs(corpus: str | Path, transcoders: str | Path, model: str) -> TranscoderHeader:
    """Refuse unusable inputs (see the module docstring); returns what the transcoder directory holds."""
    source = Path(corpus)
    if not source.is_file():
        raise CorpusError(f"corpus file {source} does not exist" if not source.exists() else f"{source} is not a file")
    return check_transcoders_fit(transcoders, model)
