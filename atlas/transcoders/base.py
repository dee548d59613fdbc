"""The transcoder interface shared by per-layer (PLT) and cross-layer (CLT) transcoders, and their common encoder.

A transcoder set has `n_layers` encoders. Layer l's features read the model activation at
`blocks.{l}.{input_hook}` (the MLP input by default) and write, through decoders, into the MLP outputs at
`blocks.{l'}.{output_hook}`: only l' = l for a PLT, every l' ≥ l for a CLT. Training, attribution and
interventions talk to transcoders only through the `Transcoder` protocol below.

Conventions: `inputs (n_layers, n_tokens, d_model)`; activations `(n_layers, n_tokens, n_features)`;
reconstructions `(n_layers, n_tokens, d_model)`; skip weights act as `x @ W_skip[l].T`.
This module must not load models or read files; see `atlas.transcoders.io` for formats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from atlas.transcoders.activations import ActivationConfig, apply_activation

TranscoderKind = Literal["plt", "clt"]


class TranscoderShapeError(ValueError):
    """Tensors handed to a transcoder do not match its dimensions."""


@dataclass(frozen=True)
class TranscoderSpec:
    """Everything that fixes a transcoder's shape and wiring (not its weights)."""

    kind: TranscoderKind
    n_layers: int
    d_model: int
    n_features: int  # per layer
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    skip: bool = False
    input_hook: str = "mlp.hook_in"
    output_hook: str = "mlp.hook_out"

    def __post_init__(self) -> None:
        if self.kind not in ("plt", "clt"):
            raise ValueError(f"unknown transcoder kind {self.kind!r}; expected 'plt' or 'clt'")
        for name in ("n_layers", "d_model", "n_features"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class TranscoderOutput(NamedTuple):
    pre_activations: torch.Tensor  # (n_layers, n_tokens, n_features)
    activations: torch.Tensor  # (n_layers, n_tokens, n_features)
    reconstruction: torch.Tensor  # (n_layers, n_tokens, d_model)


@runtime_checkable
class Transcoder(Protocol):
    """What every transcoder set offers to training, attribution and interventions."""

    spec: TranscoderSpec

    def pre_activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """`(..., d_model)` input at `layer` → `(..., n_features)` encoder pre-activations (with `b_enc`)."""
        ...

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """`(..., d_model)` → `(..., n_features)` feature activations at `layer`."""
        ...

    def forward(self, inputs: torch.Tensor) -> TranscoderOutput:
        """Encode every layer and reconstruct every output: `(n_layers, n_tokens, d_model)` in."""
        ...

    def decode_layer(
        self, target: int, activations: Sequence[torch.Tensor], x_target: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Reconstruct MLP output `target` from activations of layers `0..target` (each `(n_tokens, F)`)."""
        ...

    def decoder_vectors(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Decoder rows of `features` at source `layer`: `(n_selected, n_output_layers(layer), d_model)`."""
        ...

    def output_layers(self, layer: int) -> range:
        """The layers a feature of `layer` writes to."""
        ...

    def decoder_norms(self) -> torch.Tensor:
        """`(n_layers, n_features)` L2 norm of each feature's decoder, concatenated over its output layers."""
        ...

    def compute_skip(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Linear skip term `x @ W_skip[layer].T` (zeros when the transcoder has no skip)."""
        ...

    def fold_normalisation(self, input_scale: torch.Tensor, output_scale: torch.Tensor) -> None:
        """Make weights trained on `x·input_scale[l]` → `y·output_scale[l]` act on raw activations."""
        ...


class EncoderStack(nn.Module):
    """Encoder weights and everything that does not depend on the decoder layout (shared by PLT and CLT)."""

    kind: ClassVar[TranscoderKind]

    def __init__(self, spec: TranscoderSpec, *, bandwidth: float = 2.0, initial_threshold: float = 0.1) -> None:
        super().__init__()
        if spec.kind != self.kind:
            raise ValueError(f"{type(self).__name__} needs a spec of kind {self.kind!r}, got {spec.kind!r}")
        self.spec = spec
        self.bandwidth = bandwidth
        L, F, d = spec.n_layers, spec.n_features, spec.d_model
        self.W_enc = nn.Parameter(torch.empty(L, F, d))
        self.b_enc = nn.Parameter(torch.zeros(L, F))
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self.log_threshold = (
            nn.Parameter(torch.full((L, F), math.log(initial_threshold)))
            if spec.activation.kind == "jumprelu"
            else None
        )
        self.W_skip = nn.Parameter(torch.zeros(L, d, d)) if spec.skip else None
        bound = 1.0 / math.sqrt(F)
        nn.init.uniform_(self.W_enc, -bound, bound)

    # --- shape checks -------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor, what: str) -> None:
        if x.shape[-1] != self.spec.d_model:
            raise TranscoderShapeError(
                f"{what} has last dimension {x.shape[-1]}, but the transcoder's d_model is {self.spec.d_model}"
            )

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.spec.n_layers:
            raise TranscoderShapeError(f"layer {layer} out of range (transcoder has {self.spec.n_layers} layers)")

    # --- encoder ------------------------------------------------------------------------------------------
    @property
    def threshold(self) -> torch.Tensor | None:
        """`(n_layers, n_features)` JumpReLU thresholds, or None for ReLU/TopK."""
        return None if self.log_threshold is None else self.log_threshold.exp()

    def pre_activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        self._check_layer(layer)
        self._check_input(x, f"input to layer {layer}")
        return x @ self.W_enc[layer].T + self.b_enc[layer]

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        threshold = self.threshold
        return apply_activation(
            self.pre_activations(layer, x),
            self.spec.activation,
            None if threshold is None else threshold[layer],
            self.bandwidth,
        )

    def encode_all(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(n_layers, n_tokens, d_model)` → pre-activations and activations, both `(n_layers, n_tokens, F)`."""
        if inputs.dim() != 3 or inputs.shape[0] != self.spec.n_layers:
            raise TranscoderShapeError(
                f"expected inputs of shape (n_layers={self.spec.n_layers}, n_tokens, d_model), got"
                f" {tuple(inputs.shape)}"
            )
        self._check_input(inputs, "inputs")
        pre = torch.baddbmm(self.b_enc.unsqueeze(1), inputs, self.W_enc.transpose(1, 2))
        threshold = self.threshold
        acts = apply_activation(
            pre, self.spec.activation, None if threshold is None else threshold.unsqueeze(1), self.bandwidth
        )
        return pre, acts

    # --- skip ---------------------------------------------------------------------------------------------
    def compute_skip(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.W_skip is None:
            return torch.zeros_like(x)
        return x @ self.W_skip[layer].T

    def skip_all(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """`(n_layers, n_tokens, d)` skip terms, or None without skip."""
        return None if self.W_skip is None else torch.bmm(inputs, self.W_skip.transpose(1, 2))

    # --- layout-specific (implemented by PLT and CLT) -----------------------------------------------------
    def decode_all(self, activations: torch.Tensor) -> torch.Tensor:
        """`(n_layers, n_tokens, F)` → `(n_layers, n_tokens, d)` including `b_dec` (not the skip)."""
        raise NotImplementedError

    def decode_layer(
        self, target: int, activations: Sequence[torch.Tensor], x_target: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def decoder_vectors(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def output_layers(self, layer: int) -> range:
        raise NotImplementedError

    def decoder_norms(self) -> torch.Tensor:
        raise NotImplementedError

    def fold_normalisation(self, input_scale: torch.Tensor, output_scale: torch.Tensor) -> None:
        raise NotImplementedError

    def forward(self, inputs: torch.Tensor) -> TranscoderOutput:
        pre, acts = self.encode_all(inputs)
        recon = self.decode_all(acts)
        skip = self.skip_all(inputs)
        if skip is not None:
            recon = recon + skip
        return TranscoderOutput(pre, acts, recon)

    @torch.no_grad()
    def _fold_encoder(self, input_scale: torch.Tensor, output_scale: torch.Tensor) -> None:
        self.W_enc.mul_(input_scale.view(-1, 1, 1))
        self.b_dec.div_(output_scale.view(-1, 1))
        if self.W_skip is not None:
            self.W_skip.mul_((input_scale / output_scale).view(-1, 1, 1))
