"""Reading an ingest corpus into normalised, identified prompts, and recording what cannot be ingested.

Formats: plain text (one prompt per line), JSONL (`text_field`, plus optional `task` / `answer` fields) and Parquet
(same columns). Every prompt is normalised (Unicode NFC, whitespace runs collapsed to one space, stripped) and gets
a stable id: a hash of the model, the transcoders' identity, the attribution settings and the normalised text, so
the same prompt under the same (model, transcoders, settings) is recognised as already stored.

Problems with single lines (not UTF-8, empty after normalisation, not JSON, missing field) become `InputIssue`s
with the line number and the reason; the valid prompts are still returned. Problems with the whole corpus (missing
file, no prompts at all, a field no record has) raise `CorpusError` with a message naming the file and the problem.
This module reads and hashes; it runs no model and touches no store.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlas.training.corpus import CorpusError

__all__ = ["CorpusError", "InputIssue", "PromptRecord", "normalise", "prompt_key", "read_corpus"]

_WHITESPACE = re.compile(r"\s+")
META_FIELDS = ("task", "answer")  # optional per-prompt fields carried into the store
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})


@dataclass(frozen=True)
class PromptRecord:
    """One valid prompt of the corpus: normalised text, where it came from, and its optional tags."""

    text: str
    line: int  # 1-based line (text/JSONL) or row (Parquet)
    meta: dict[str, str] = field(default_factory=dict)  # task, answer (when the corpus has them)


@dataclass(frozen=True)
class InputIssue:
    """A line that cannot become a prompt, and why (recorded in the ledger; never retried)."""

    line: int
    error: str


def normalise(text: str) -> str:
    """NFC, whitespace runs collapsed to one space, stripped."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def prompt_key(text: str, *, model: str, transcoder_id: str, settings: Mapping[str, Any]) -> str:
    """The prompt id: 20 hex digits of SHA-256 over (model, transcoder identity, settings, normalised text)."""
    payload = json.dumps([model, transcoder_id, dict(settings), text], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def read_corpus(path: str | Path, *, text_field: str = "text") -> tuple[list[PromptRecord], list[InputIssue]]:
    """Valid prompts and per-line issues of `path`; `CorpusError` when the corpus as a whole is unusable."""
    source = Path(path)
    if not source.is_file():
        raise CorpusError(f"corpus file {source} does not exist" if not source.exists() else f"{source} is not a file")
    suffix = source.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows = _jsonl_rows(source, text_field)
    elif suffix == ".parquet":
        rows = _parquet_rows(source, text_field)
    else:
        rows = _text_rows(source)
    records: list[PromptRecord] = []
    issues: list[InputIssue] = []
    n_missing_field = n_rows = 0
    for line, raw, meta, problem in rows:
        n_rows += 1
        if problem is not None:
            issues.append(InputIssue(line, problem))
            n_missing_field += problem.startswith("no field")
            continue
        text = normalise(raw or "")
        if not text:
            issues.append(InputIssue(line, "the prompt is empty after normalisation"))
            continue
        records.append(PromptRecord(text, line, meta))
    if n_rows == 0:
        raise CorpusError(f"corpus {source} is empty (no lines)")
    if n_missing_field and not records and n_missing_field == sum(i.error.startswith("no field") for i in issues):
        example = next(i.error for i in issues if i.error.startswith("no field"))
        raise CorpusError(f"corpus {source}: no record has the field {text_field!r} ({example})")
    if not records:
        reasons = "; ".join(f"line {i.line}: {i.error}" for i in issues[:3])
        raise CorpusError(f"corpus {source} has no valid prompt ({len(issues)} unusable line(s): {reasons})")
    return records, issues


Row = tuple[int, str | None, dict[str, str], str | None]  # line, text, meta, problem


def _decoded_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text or None, problem or None) for every non-blank line; bad UTF-8 is a problem, not a crash."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, None, f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                continue
            if line.strip():
                yield number, line.rstrip("\r\n"), None


def _text_rows(path: Path) -> Iterator[Row]:
    for number, text, problem in _decoded_lines(path):
        yield number, text, {}, problem


def _meta(record: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(record[k]) for k in META_FIELDS if record.get(k) is not None}


def _jsonl_rows(path: Path, text_field: str) -> Iterator[Row]:
    for number, line, problem in _decoded_lines(path):
        if problem is not None or line is None:
            yield number, None, {}, problem
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            yield number, None, {}, f"invalid JSON ({err.msg})"
            continue
        if not isinstance(record, dict):
            yield number, None, {}, f"expected a JSON object, got {type(record).__name__}"
        elif text_field not in record:
            yield number, None, {}, f"no field {text_field!r} (fields: {', '.join(sorted(record))})"
        elif not isinstance(record[text_field], str):
            yield number, None, {}, f"field {text_field!r} is {type(record[text_field]).__name__}, not a string"
        else:
            yield number, record[text_field], _meta(record), None


def _parquet_rows(path: Path, text_field: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise CorpusError(f"{path}: not a readable Parquet file ({err})") from err
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise CorpusError(f"corpus {path}: no column {text_field!r} (columns: {', '.join(names)})")
    columns = [text_field, *(k for k in META_FIELDS if k in names and k != text_field)]
    row = 0
    for batch in parquet.iter_batches(columns=columns):
        for record in batch.to_pylist():
            row += 1
            text = record[text_field]
            if text is None:
                yield row, None, {}, f"column {text_field!r} is null"
            else:
                yield row, str(text), _meta(record), None
