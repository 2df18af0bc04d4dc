"""TopK sparse autoencoder.

Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (arXiv:2406.04093): keep the
``k`` largest pre-activations of each row, ReLU them, zero the rest. Pre-encoder bias
``b_pre`` subtracted before encoding and added back after decoding; decoder rows at unit
norm; the encoder initialised as the decoder's transpose; the AuxK loss (§A.2) revives dead
latents by having them reconstruct what the live ones miss.
"""

from __future__ import annotations

import torch
from torch import nn

from hsae.sae.base import (
    AuxKMixin,
    ForwardOutput,
    SparseAutoencoder,
    UnitNormDecoderMixin,
    check_k,
    check_positive_int,
    normalized_mse,
    topk_codes,
)


class TopKSAE(UnitNormDecoderMixin, AuxKMixin, SparseAutoencoder):
    arch = "topk"

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        k: int,
        k_aux: int | None = None,
        aux_coeff: float = 1 / 32,  # the paper's weight
        # Rows, not LM tokens: ~ one pass over ImageNet-1k CLS tokens (the paper: 10M tokens).
        dead_tokens_threshold: int = 1_000_000,
    ):
        super().__init__()
        check_positive_int("n_latents", n_latents)
        check_k(k, n_latents)
        self.d_model, self.n_latents, self.k = d_model, n_latents, k
        self.k_aux, self.aux_coeff = k_aux, aux_coeff
        self.dead_tokens_threshold = dead_tokens_threshold
        self.b_pre = nn.Parameter(torch.zeros(d_model))
        self.W_enc = nn.Parameter(torch.empty(d_model, n_latents))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_model))
        self._init_auxk(n_latents)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.W_dec)
        self.normalize_decoder()
        with torch.no_grad():
            self.W_enc.copy_(self.W_dec.T)
            self.b_enc.zero_()
            self.b_pre.zero_()

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations of ``x`` in normalised units (``x / input_scale``)."""
        return (x - self.b_pre) @ self.W_enc + self.b_enc

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return topk_codes(self.pre_acts(x), self.k)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W_dec + self.b_pre

    def _forward(self, x: torch.Tensor) -> ForwardOutput:
        dead_l = self.dead_latents()
        pre_nl = self.pre_acts(x)
        codes = topk_codes(pre_nl, self.k)
        x_hat = self._decode(codes)
        recon = normalized_mse(x_hat, x)
        aux = self._auxk_loss(pre_nl, x, x_hat, dead_l, self.W_dec)
        if self.training:
            self._update_fired(codes)
        loss = recon if aux is None else recon + aux
        return ForwardOutput(x_hat=x_hat, codes=codes, loss=loss, recon_loss=recon, aux_loss=aux)
