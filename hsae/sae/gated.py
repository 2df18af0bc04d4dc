"""Gated sparse autoencoder.

Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders"
(arXiv:2404.16014). The encoder splits *which* latents fire from *how much*:

    pi_gate = W_gate (x - b_pre) + b_gate            f_gate = 1[pi_gate > 0]
    pi_mag  = (exp(r_mag) * W_gate) (x - b_pre) + b_mag   f_mag = ReLU(pi_mag)
    f = f_gate * f_mag,   x_hat = W_dec f + b_pre

The two paths share ``W_gate`` (rescaled per latent by ``exp(r_mag)``), so the gated SAE
costs about what a ReLU SAE does. The L1 penalty falls on ``ReLU(pi_gate)`` only, so it
does not shrink the magnitudes; since the step ``f_gate`` has no gradient, an auxiliary
loss reconstructs ``x`` from ``ReLU(pi_gate)`` through a frozen (detached) copy of the
decoder, which trains the gate path to reconstruct without moving the decoder. Decoder
rows at unit norm; ``W_gate`` initialised as the decoder's transpose; ``r_mag``, biases 0.
``l1_coeff`` is on the scale of ``relu``'s (see ``hsae.sae.base.l1_scale``) and warms up
over ``l1_warmup_fraction`` of training.
"""

from __future__ import annotations

import torch
from torch import nn

from hsae.sae.base import (
    ForwardOutput,
    SparseAutoencoder,
    UnitNormDecoderMixin,
    l1_scale,
    normalized_mse,
)
from hsae.sae.relu import L1PenaltyMixin


class GatedSAE(L1PenaltyMixin, UnitNormDecoderMixin, SparseAutoencoder):
    arch = "gated"
    encoder_weights = ("W_gate",)  # the magnitude path reuses it
    latent_vectors = ("b_gate", "r_mag", "b_mag")
    W_gate: nn.Parameter
    b_gate: nn.Parameter
    r_mag: nn.Parameter
    b_mag: nn.Parameter
    # Constructor: L1PenaltyMixin's (ReLU's arguments).

    def _paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pi_gate, codes)``; the magnitude path reuses the gate's projection."""
        projected = (x - self.b_pre) @ self.W_gate
        pi_gate = projected + self.b_gate
        pi_mag = projected * self.r_mag.exp() + self.b_mag
        return pi_gate, (pi_gate > 0).to(x.dtype) * pi_mag.relu()

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._paths(x)[1]

    def _forward(self, x: torch.Tensor) -> ForwardOutput:
        pi_gate, codes = self._paths(x)
        x_hat = self._decode(codes)
        recon = normalized_mse(x_hat, x)
        gate_acts = pi_gate.relu()
        sparsity = self.l1_coeff * self.l1_warmup * gate_acts.sum(dim=-1).mean() / l1_scale(x)
        x_hat_frozen = gate_acts @ self.W_dec.detach() + self.b_pre.detach()
        aux = normalized_mse(x_hat_frozen, x)
        return ForwardOutput(
            x_hat=x_hat,
            codes=codes,
            loss=recon + aux + sparsity,
            recon_loss=recon,
            aux_loss=aux,
            sparsity_loss=sparsity,
        )
