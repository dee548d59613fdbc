from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atlas.training.activations import iter_sequences
from atlas.training.corpus import CorpusError, build_offline_corpus, iter_documents


def test_plain_text_splits_on_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("first line\nstill first\n\n\nsecond\n")
    assert list(iter_documents(path)) == ["first line\nstill first", "second"]


def test_jsonl_and_parquet_read_the_named_field(tmp_path: Path) -> None:
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"body": "a"}) + "\n\n" + json.dumps({"body": "b"}) + "\n")
    assert list(iter_documents(jsonl, text_field="body")) == ["a", "b"]
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["x", "", "y"], "n": [1, 2, 3]}), parquet)
    assert list(iter_documents(parquet, text_field="body")) == ["x", "y"]


def test_bad_corpora_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        list(iter_documents(tmp_path / "missing.jsonl"))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"body": "a"}) + "\n")
    with pytest.raises(CorpusError, match=r"c.jsonl:1: no field 'text' \(found \['body'\]\)"):
        list(iter_documents(jsonl))
    jsonl.write_text("{not json\n")
    with pytest.raises(CorpusError, match=r"c.jsonl:1: invalid JSON"):
        list(iter_documents(jsonl))
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["x"]}), parquet)
    with pytest.raises(CorpusError, match="no column 'text'"):
        list(iter_documents(parquet))


def test_sequences_start_with_bos_and_hold_out_evaluation() -> None:
    docs = ["abcdefgh", "ijklmnop"]
    seqs = iter_sequences(lambda: iter(docs), lambda t: [ord(c) for c in t], bos=0, eos=1, length=5)
    first = [next(seqs) for _ in range(5)]
    assert all(s[0] == 0 and len(s) == 5 for s in first)
    assert first[0] == [0, *map(ord, "abcd")]
    held_out = iter_sequences(lambda: iter(docs), lambda t: [ord(c) for c in t], bos=0, eos=1, length=5, skip_first=1)
    assert next(held_out) == first[1]


def test_empty_corpus_is_an_error() -> None:
    seqs = iter_sequences(lambda: iter(["", "ab"]), lambda t: [ord(c) for c in t], bos=0, eos=1, length=64)
    with pytest.raises(CorpusError, match="empty or too small"):
        next(seqs)


def test_offline_corpus_builder_splits_fortune_files(tmp_path: Path) -> None:
    source = tmp_path / "fortunes"
    source.mkdir()
    (source / "wisdom").write_text("Know thyself.\n%\nNothing in excess.\n\t-- Delphi\n%\n")
    (source / "wisdom.dat").write_bytes(b"\x00\x01")  # index files are ignored
    target = tmp_path / "out.jsonl"
    assert build_offline_corpus(target, source) == 2
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert records[1] == {"text": "Nothing in excess.\n\t-- Delphi", "source": "debian:fortunes/wisdom"}
    with pytest.raises(CorpusError, match="apt-get install fortunes"):
        build_offline_corpus(target, tmp_path / "absent")


def test_real_offline_corpus_is_english_prose() -> None:
    docs = list(iter_documents("offline"))
    assert len(docs) > 5000
    words = sum(len(d.split()) for d in docs)
    assert words > 200_000
    assert sum(" the " in d for d in docs) > 1000
