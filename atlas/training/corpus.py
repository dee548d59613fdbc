"""Text corpora for transcoder training: plain text, JSONL, Parquet, a hub dataset, and the offline default.

A corpus is an iterable of documents (strings). Readers stream; nothing loads a whole file into memory except the
Parquet reader, which streams row groups.

The offline default is Debian's `fortunes` package: about 2.8 MB of English quotations, literature excerpts,
poems, definitions and jokes (`/usr/share/games/fortunes`, entries separated by `%` lines). `atlas corpus offline`
converts it to JSONL in the cache directory, one fortune per document, and records its provenance.
This module knows nothing about models or tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from atlas.config import OFFLINE_CORPUS_DEBIAN_PACKAGE, OFFLINE_CORPUS_SOURCE_DIR, cache_dir

OFFLINE_CORPUS_NAME = "offline"


class CorpusError(ValueError):
    """A corpus is missing, empty, malformed, or lacks the requested field."""


def iter_documents(source: str | Path, *, text_field: str = "text") -> Iterator[str]:
    """Documents of `source`: a .txt/.jsonl/.parquet file, `offline`, or a hub dataset name (`hf:NAME`).

    Plain text: documents are separated by blank lines. JSONL and Parquet: the `text_field` column.
    Empty documents are skipped.
    """
    if str(source) == OFFLINE_CORPUS_NAME:
        source = offline_corpus_path()
    if isinstance(source, str) and source.startswith("hf:"):
        yield from _iter_hub_dataset(source[3:], text_field)
        return
    path = Path(source)
    if not path.is_file():
        raise CorpusError(f"corpus file {path} does not exist")
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        yield from _iter_jsonl(path, text_field)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, text_field)
    else:
        yield from _iter_text(path)


def _iter_text(path: Path) -> Iterator[str]:
    paragraph: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                paragraph.append(line.rstrip("\n"))
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{path}:{line_number}: invalid JSON ({err.msg})") from err
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise CorpusError(f"{path}:{line_number}: no field {text_field!r} (found {keys})")
            text = record[text_field]
            if isinstance(text, str) and text.strip():
                yield text


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise CorpusError(f"{path}: not a readable Parquet file ({err})") from err
    if text_field not in parquet.schema_arrow.names:
        raise CorpusError(f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names})")
    for batch in parquet.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def _iter_hub_dataset(name: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:
        raise CorpusError("hub datasets need the `datasets` package: pip install datasets") from err
    try:
        dataset = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as err:  # network and lookup errors come in many types
        raise CorpusError(f"could not open hub dataset {name!r} ({err}); offline? use a local file") from err
    for record in dataset:
        text = record.get(text_field)
        if isinstance(text, str) and text.strip():
            yield text


# ---------------------------------------------------------------------------------------------------------
# offline default corpus


def offline_corpus_path() -> Path:
    """JSONL of the offline corpus, built from Debian's `fortunes` on first use."""
    target = cache_dir() / "corpora" / "fortunes.jsonl"
    if not target.exists():
        build_offline_corpus(target)
    return target


def build_offline_corpus(target: Path, source_dir: Path = OFFLINE_CORPUS_SOURCE_DIR) -> int:
    """Convert every fortune file under `source_dir` into `target` JSONL; returns the number of documents."""
    files = sorted(p for p in source_dir.glob("*") if p.is_file() and not p.suffix) if source_dir.is_dir() else []
    if not files:
        raise CorpusError(
            f"the offline corpus needs Debian's {OFFLINE_CORPUS_DEBIAN_PACKAGE!r} package ({source_dir} is missing"
            f" or empty): sudo apt-get install {OFFLINE_CORPUS_DEBIAN_PACKAGE}; or pass your own --corpus"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as out:
        for path in files:
            for text in _split_fortunes(path.read_text(encoding="utf-8", errors="replace")):
                out.write(json.dumps({"text": text, "source": f"debian:fortunes/{path.name}"}) + "\n")
                count += 1
    tmp.replace(target)
    return count


def _split_fortunes(content: str) -> Iterator[str]:
    entry: list[str] = []
    for line in content.splitlines():
        if line.strip() == "%":
            text = "\n".join(entry).strip()
            if text:
                yield text
            entry = []
        else:
            entry.append(line)
    text = "\n".join(entry).strip()
    if text:
        yield text
