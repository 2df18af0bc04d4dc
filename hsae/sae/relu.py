"""ReLU sparse autoencoder with an L1 penalty, as in Anthropic's April 2024 update.

Conerly et al., "Circuits Updates – April 2024: Update on how we train SAEs"
(transformer-circuits.pub/2024/april-update): ``f = ReLU(W_enc (x - b_pre) + b_enc)``,
``x_hat = W_dec f + b_pre``, loss ``||x - x_hat||^2 + lambda * sum_i f_i ||W_dec,i||``.
Weighting each latent's L1 by its decoder row's norm replaces the unit-norm constraint:
the decoder is free, and shrinking a row no longer buys sparsity. ``lambda`` ramps up
linearly from 0 over the first ``l1_warmup_fraction`` of training (5% in the update);
decoder rows start as random directions of norm 0.1 and the encoder as their transpose.

Subtracting ``b_pre`` before encoding (the update encodes ``x`` itself) only moves
``b_enc``; it lets ``init_b_pre`` centre the data as for every other architecture.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hsae.config import SAEConfig
from hsae.errors import HsaeError
from hsae.sae.base import (
    ForwardOutput,
    SparseAutoencoder,
    check_fraction,
    check_positive_int,
    l1_scale,
    normalized_mse,
    warmup_scale,
)

INIT_DECODER_NORM = 0.1  # the update: 0.05 to 1 all train well; 0.1 is its choice


def check_l1(l1_coeff: float, l1_warmup_fraction: float) -> None:
    if not l1_coeff >= 0:
        raise HsaeError(f"sae.l1_coeff={l1_coeff!r} must be >= 0 (the update uses ~5)")
    check_fraction("l1_warmup_fraction", l1_warmup_fraction)


class L1PenaltyMixin:
    """The L1 sparsity penalty of ReLU and Gated SAEs, its coefficient warmed up linearly
    over the first ``l1_warmup_fraction`` of training (the trainer reports progress), and
    their constructor (they take the same arguments)."""

    _declare_parameters: Callable[[int, int], None]
    reset_parameters: Callable[[], None]

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        # Defaults (and why): hsae.config.SAEConfig, the one place they are written.
        l1_coeff: float = SAEConfig.l1_coeff,
        l1_warmup_fraction: float = SAEConfig.l1_warmup_fraction,
    ):
        super().__init__()
        check_positive_int("n_latents", n_latents)
        self._init_l1(l1_coeff, l1_warmup_fraction)
        self.d_model, self.n_latents = d_model, n_latents
        self._declare_parameters(d_model, n_latents)
        self.reset_parameters()

    def _init_l1(self, l1_coeff: float, l1_warmup_fraction: float) -> None:
        check_l1(l1_coeff, l1_warmup_fraction)
        self.l1_coeff, self.l1_warmup_fraction = l1_coeff, l1_warmup_fraction
        self.l1_warmup = 1.0  # full coefficient unless a trainer reports its progress

    def set_progress(self, step: int, total_steps: int) -> None:
        self.l1_warmup = warmup_scale(step, total_steps, self.l1_warmup_fraction)


class ReLUSAE(L1PenaltyMixin, SparseAutoencoder):
    arch = "relu"
    W_enc: nn.Parameter
    b_enc: nn.Parameter

    @torch.no_grad()
    def _init_decoder(self) -> None:
        # The update's init: Gaussian directions at norm INIT_DECODER_NORM (the decoder is free).
        nn.init.normal_(self.W_dec)
        self.W_dec.mul_(INIT_DECODER_NORM / self.W_dec.norm(dim=-1, keepdim=True))

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.b_pre) @ self.W_enc + self.b_enc).relu()

    def _forward(self, x: torch.Tensor) -> ForwardOutput:
        codes = self._encode(x)
        x_hat = self._decode(codes)
        recon = normalized_mse(x_hat, x)
        weighted_l1 = (codes * self.W_dec.norm(dim=-1)).sum(dim=-1).mean()
        sparsity = self.l1_coeff * self.l1_warmup * weighted_l1 / l1_scale(x)
        return ForwardOutput(
            x_hat=x_hat,
            codes=codes,
            loss=recon + sparsity,
            recon_loss=recon,
            sparsity_loss=sparsity,
        )
