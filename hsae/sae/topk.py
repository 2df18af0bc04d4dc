"""TopK sparse autoencoder.

Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (arXiv:2406.04093): keep the
``k`` largest pre-activations of each row, ReLU them, zero the rest. Pre-encoder bias
``b_pre`` subtracted before encoding and added back after decoding; decoder rows at unit
norm; the encoder initialised as the decoder's transpose.
"""

from __future__ import annotations

import torch
from torch import nn

from hsae.sae.base import ForwardOutput, UnitNormDecoderMixin, geometric_median, normalized_mse


class TopKSAE(UnitNormDecoderMixin, nn.Module):
    arch = "topk"

    def __init__(self, d_model: int, n_latents: int, k: int):
        super().__init__()
        self.d_model, self.n_latents, self.k = d_model, n_latents, k
        self.b_pre = nn.Parameter(torch.zeros(d_model))
        self.W_enc = nn.Parameter(torch.empty(d_model, n_latents))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.W_dec)
        self.normalize_decoder()
        with torch.no_grad():
            self.W_enc.copy_(self.W_dec.T)
            self.b_enc.zero_()
            self.b_pre.zero_()

    def config(self) -> dict:
        """Constructor arguments: with the state dict, all that rebuilds this SAE."""
        return {
            "arch": self.arch,
            "d_model": self.d_model,
            "n_latents": self.n_latents,
            "k": self.k,
        }

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_pre) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        top = self.pre_acts(x).topk(self.k, dim=-1, sorted=False)
        codes = torch.zeros(x.shape[0], self.n_latents, dtype=top.values.dtype, device=x.device)
        return codes.scatter_(-1, top.indices, top.values.relu())

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W_dec + self.b_pre

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        codes = self.encode(x)
        x_hat = self.decode(codes)
        recon = normalized_mse(x_hat, x)
        return ForwardOutput(x_hat=x_hat, codes=codes, loss=recon, recon_loss=recon)

    @torch.no_grad()
    def init_b_pre(self, sample_nd: torch.Tensor, method: str = "geometric_median") -> None:
        """Centre the encoder on the data: the geometric median is robust to outlier rows."""
        if method == "geometric_median":
            self.b_pre.copy_(geometric_median(sample_nd.float()))
        elif method == "mean":
            self.b_pre.copy_(sample_nd.float().mean(dim=0))
