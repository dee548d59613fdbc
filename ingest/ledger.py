"""The run's ledger: an append-only JSONL record of prompts done and failed, for resuming and for the report.

One line per event: `{"prompt_id", "status": "done"|"failed", "kind", "line", "error", "run", "t"}`. The store is
the source of truth for "done" (a prompt is done when Neo4j has it); the ledger adds what the store cannot say: which
prompts failed deterministically and why, so a rerun skips them instead of failing on them again. Lines are flushed
one by one; a torn last line (a crash mid-write) is ignored when reading. This module knows nothing of Dask or stores.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

LEDGER_FILE = "ledger.jsonl"

FAIL_INPUT = "input"  # the corpus line cannot be a prompt (not UTF-8, empty, bad JSON, missing field)
FAIL_PROMPT = "prompt"  # the prompt cannot be attributed (too long, unknown target): deterministic
FAIL_TASK = "task"  # its batch failed after every retry (transient or unknown): retried on the next run


@dataclass
class LedgerState:
    done: set[str] = field(default_factory=set)
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)  # prompt id -> last failure entry

    def deterministic_failures(self) -> dict[str, dict[str, Any]]:
        return {pid: e for pid, e in self.failed.items() if e.get("kind") == FAIL_PROMPT and pid not in self.done}


class Ledger:
    """Appends to `<run_dir>/ledger.jsonl`; `read()` folds it into a `LedgerState`."""

    def __init__(self, run_dir: Path, run: str) -> None:
        self.path = run_dir / LEDGER_FILE
        self.run = run
        self._handle: IO[str] | None = None

    def read(self) -> LedgerState:
        state = LedgerState()
        if not self.path.exists():
            return state
        with self.path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn line from a crash
                pid = entry.get("prompt_id")
                if entry.get("status") == "done" and pid:
                    state.done.add(pid)
                    state.failed.pop(pid, None)
                elif entry.get("status") == "failed":
                    state.failed[pid or f"line:{entry.get('line')}"] = entry
        return state

    def _write(self, entry: dict[str, Any]) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("a", encoding="utf-8")
        self._handle.write(json.dumps({**entry, "run": self.run, "t": round(time.time(), 3)}) + "\n")
        self._handle.flush()

    def done(self, prompt_ids: list[str]) -> None:
        for pid in prompt_ids:
            self._write({"prompt_id": pid, "status": "done"})

    def failed(self, prompt_id: str | None, *, kind: str, error: str, line: int | None = None) -> None:
        self._write({"prompt_id": prompt_id, "status": "failed", "kind": kind, "line": line, "error": error})

    def close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None
