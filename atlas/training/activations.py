"""Stream transcoder training data (MLP inputs and outputs at every layer) from a model over a text corpus.

Pipeline: documents → tokens (documents joined by EOS) → sequences of `context_length` tokens, each starting with
the model's BOS → model forward in mini-batches, capturing `blocks.{l}.{input_hook}` and `blocks.{l}.{output_hook}`
→ position 0 (BOS) dropped (attribution never attributes through it) → a shuffling buffer → training batches.

The shuffling buffer works chunk by chunk: a chunk of `chunk_sequences` sequences is run through the model and its
tokens are served in an order drawn from a generator seeded by `(seed, chunk index)`. Batch `k` of the stream is
therefore a pure function of (corpus, model, settings, k): resuming at step k re-tokenizes the skipped chunks
(cheap, no model forward), recomputes the current chunk, and continues with exactly the batches an uninterrupted
run would have seen. Tokens left over at the end of a chunk (fewer than a batch) are dropped. With `passes > 1`
each chunk's activations are served that many times, each pass in its own order (seeded by chunk and pass): the
model, the expensive part on a CPU, runs once for `passes` times the training signal.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atlas.config import require_at_least
from atlas.models.loading import LoadedModel
from atlas.training.corpus import CorpusError, iter_documents

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """How activations are produced and shuffled. `batch_size` counts tokens."""

    corpus: str = "offline"
    text_field: str = "text"
    context_length: int = 64
    batch_size: int = 256
    chunk_sequences: int = 64
    model_batch_size: int = 16
    seed: int = 0
    eval_sequences: int = 8  # held out from training, used for the spliced next-token loss
    passes: int = 1  # batches served from each chunk's activations, in that many fresh shuffles (model runs once)

    @property
    def tokens_per_chunk(self) -> int:
        return self.chunk_sequences * (self.context_length - 1)

    @property
    def batches_per_chunk(self) -> int:
        return self.tokens_per_chunk // self.batch_size

    @property
    def steps_per_chunk(self) -> int:
        """Training steps one model pass over a chunk feeds: every pass serves all its whole batches."""
        return self.batches_per_chunk * self.passes

    def __post_init__(self) -> None:
        if self.context_length < 2:
            raise ValueError("context_length must be at least 2 (BOS plus one token)")
        require_at_least(
            "activation stream",
            {
                "batch_size": (self.batch_size, 1),
                "chunk_sequences": (self.chunk_sequences, 1),
                "model_batch_size": (self.model_batch_size, 1),
                "eval_sequences": (self.eval_sequences, 1),
                "seed": (self.seed, 0),
                "passes": (self.passes, 1),
            },
        )
        if self.batches_per_chunk < 1:
            raise ValueError(
                f"a shuffle chunk of {self.chunk_sequences} sequences × {self.context_length - 1} tokens holds"
                f" fewer tokens than one batch ({self.batch_size}); raise chunk_sequences"
            )


def iter_sequences(
    documents: Callable[[], Iterator[str]],
    tokenize: Callable[[str], list[int]],
    *,
    bos: int,
    eos: int,
    length: int,
    skip_first: int = 0,
    cycle: bool = True,
) -> Iterator[list[int]]:
    """Sequences of `length` token ids, `[bos] + length − 1 corpus tokens`, cycling over the corpus.

    The first `skip_first` sequences of every pass are left out (they are the held-out evaluation set).
    """
    body = length - 1
    epoch = 0
    while True:
        buffer: list[int] = []
        produced = 0
        for text in documents():
            buffer.extend(tokenize(text))
            buffer.append(eos)
            while len(buffer) >= body:
                if produced >= skip_first:
                    yield [bos, *buffer[:body]]
                buffer = buffer[body:]
                produced += 1
        if not cycle:
            return
        if produced <= skip_first:
            raise CorpusError(
                f"the corpus is empty or too small: it holds {produced} sequences of {body} tokens, and the"
                f" first {skip_first} are held out for evaluation; provide more text"
            )
        epoch += 1
        log.info("corpus exhausted after %d sequences; starting pass %d", produced, epoch + 1)


class ActivationStream:
    """Yields `(inputs, targets)` batches, each `(n_layers, batch_size, d_model)`, deterministically by step."""

    def __init__(self, model: LoadedModel, config: StreamConfig, *, input_hook: str, output_hook: str) -> None:
        self.model = model
        self.config = config
        self.input_hook = input_hook
        self.output_hook = output_hook
        self.n_layers = model.info.n_layers
        eos = model.tokenizer.eos_token_id
        self._eos = int(eos if eos is not None else model.info.bos_token_id)
        source = config.corpus
        if source != "offline" and not source.startswith("hf:") and not Path(source).is_file():
            raise CorpusError(f"corpus file {source} does not exist")

    def _tokenize(self, text: str) -> list[int]:
        return list(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _sequences(self, *, evaluation: bool = False) -> Iterator[list[int]]:
        return iter_sequences(
            lambda: iter_documents(self.config.corpus, text_field=self.config.text_field),
            self._tokenize,
            bos=self.model.info.bos_token_id,
            eos=self._eos,
            length=self.config.context_length,
            skip_first=0 if evaluation else self.config.eval_sequences,
            cycle=not evaluation,
        )

    def evaluation_tokens(self) -> torch.Tensor:
        """The held-out sequences `(eval_sequences, context_length)`, never used for training."""
        rows = list(itertools.islice(self._sequences(evaluation=True), self.config.eval_sequences))
        if len(rows) < self.config.eval_sequences:
            raise CorpusError(
                f"the corpus holds only {len(rows)} sequences; {self.config.eval_sequences} are"
                " needed for evaluation alone"
            )
        return torch.tensor(rows)

    @torch.no_grad()
    def collect(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run `(n_seq, ctx)` tokens; return inputs and targets `(n_layers, n_seq · (ctx − 1), d)` without BOS."""
        names = {f"blocks.{layer}.{self.input_hook}": (0, layer) for layer in range(self.n_layers)}
        names.update({f"blocks.{layer}.{self.output_hook}": (1, layer) for layer in range(self.n_layers)})
        captured: dict[tuple[int, int], torch.Tensor] = {}

        def capture(tensor: torch.Tensor, hook: Any) -> None:
            captured[names[hook.name]] = tensor[:, 1:].detach().reshape(-1, tensor.shape[-1]).float()

        self.model.model.run_with_hooks(token_ids.to(self.model.device), fwd_hooks=[(n, capture) for n in names])
        missing = [name for name, key in names.items() if key not in captured]
        if missing:
            raise RuntimeError(f"hooks never fired: {missing[:3]}; check the transcoder's hook names")
        inputs = torch.stack([captured[(0, layer)] for layer in range(self.n_layers)])
        targets = torch.stack([captured[(1, layer)] for layer in range(self.n_layers)])
        return inputs, targets

    def _chunk(self, sequences: Iterator[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        rows = [next(sequences) for _ in range(cfg.chunk_sequences)]
        parts = [
            self.collect(torch.tensor(rows[i : i + cfg.model_batch_size]))
            for i in range(0, len(rows), cfg.model_batch_size)
        ]
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches from global step `start_step` on; identical to what an uninterrupted stream yields there."""
        cfg = self.config
        chunk_index, offset = divmod(start_step, cfg.steps_per_chunk)
        sequences = self._sequences()
        for _ in range(chunk_index * cfg.chunk_sequences):
            next(sequences)
        while True:
            inputs, targets = self._chunk(sequences)
            for position in range(offset, cfg.steps_per_chunk):
                pass_index, b = divmod(position, cfg.batches_per_chunk)
                if b == 0 or position == offset:
                    seed = cfg.seed * 1_000_003 + chunk_index + pass_index * 7_919_000_009
                    order = torch.randperm(inputs.shape[1], generator=torch.Generator().manual_seed(seed))
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                yield inputs[:, idx], targets[:, idx]
            offset = 0
            chunk_index += 1
