"""JumpReLU sparse autoencoder.

Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
Sparse Autoencoders" (arXiv:2407.14435). Each latent has a learned threshold ``theta_i``
(stored as its log, so it stays positive): ``f_i = z_i * H(z_i - theta_i)`` with
``z = W_enc (x - b_pre) + b_enc``, and the loss penalises L0 directly,
``||x - x_hat||^2 + lambda * ||f||_0``. Both the jump and the step have zero gradient
with respect to ``theta`` almost everywhere, so the paper's straight-through estimators
replace it with a kernel density estimate (rectangle kernel of width ``bandwidth``):

    d/dtheta JumpReLU(z) := -(theta / eps) K((z - theta) / eps)
    d/dtheta H(z - theta) := -(1 / eps) K((z - theta) / eps),  K(u) = 1[|u| < 1/2]

so only rows whose pre-activation lies within ``eps/2`` of a threshold move it. ``z``
gets the plain gradient through the jump (``H(z - theta)``) and none through the L0 term.
Decoder rows at unit norm (as in the paper and Gemma Scope), encoder initialised as the
decoder's transpose, thresholds at 0.001. ``bandwidth`` and ``init_threshold`` are in the
units of the pre-activations: the paper's 0.001 assumes inputs normalised to unit mean
squared norm, which ``set_input_scale`` provides (without it they are in the activations'
raw units). The L0 coefficient warms up linearly over ``sparsity_warmup_fraction``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hsae.config import SAEConfig
from hsae.errors import HsaeError
from hsae.sae.base import (
    ForwardOutput,
    SparseAutoencoder,
    UnitNormDecoderMixin,
    check_fraction,
    check_positive_int,
    normalized_mse,
    warmup_scale,
)


def _rectangle(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return (((pre - threshold) / bandwidth).abs() < 0.5).to(pre.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        grad_pre = grad_out * (pre > threshold).to(pre.dtype)
        kernel = _rectangle(pre, threshold, ctx.bandwidth)
        grad_threshold = -(threshold / ctx.bandwidth) * kernel * grad_out
        return grad_pre, grad_threshold.reshape(-1, pre.shape[-1]).sum(dim=0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        kernel = _rectangle(pre, threshold, ctx.bandwidth)
        grad_threshold = -(1.0 / ctx.bandwidth) * kernel * grad_out
        return torch.zeros_like(pre), grad_threshold.reshape(-1, pre.shape[-1]).sum(dim=0), None


class JumpReLUSAE(UnitNormDecoderMixin, SparseAutoencoder):
    arch = "jumprelu"
    latent_vectors = ("b_enc", "log_threshold")
    W_enc: nn.Parameter
    b_enc: nn.Parameter
    log_threshold: nn.Parameter

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        # Defaults (and why): hsae.config.SAEConfig, the one place they are written.
        bandwidth: float = SAEConfig.bandwidth,
        sparsity_coeff: float = SAEConfig.sparsity_coeff,
        sparsity_warmup_fraction: float = SAEConfig.sparsity_warmup_fraction,
        init_threshold: float = SAEConfig.init_threshold,
    ):
        super().__init__()
        check_positive_int("n_latents", n_latents)
        if not bandwidth > 0:
            raise HsaeError(f"sae.bandwidth={bandwidth!r} must be > 0 (the paper uses 0.001)")
        if not sparsity_coeff >= 0:
            raise HsaeError(f"sae.sparsity_coeff={sparsity_coeff!r} must be >= 0")
        check_fraction("sparsity_warmup_fraction", sparsity_warmup_fraction)
        if not init_threshold > 0:
            raise HsaeError(f"sae.init_threshold={init_threshold!r} must be > 0 (it is a log)")
        self.d_model, self.n_latents = d_model, n_latents
        self.bandwidth, self.sparsity_coeff = bandwidth, sparsity_coeff
        self.sparsity_warmup_fraction = sparsity_warmup_fraction
        self.init_threshold = init_threshold
        self.sparsity_warmup = 1.0  # full coefficient unless a trainer reports its progress
        self._declare_parameters(d_model, n_latents)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.log_threshold.fill_(math.log(self.init_threshold))

    def set_progress(self, step: int, total_steps: int) -> None:
        self.sparsity_warmup = warmup_scale(step, total_steps, self.sparsity_warmup_fraction)

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations of ``x`` in normalised units (``x / input_scale``)."""
        return (x - self.b_pre) @ self.W_enc + self.b_enc

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return _JumpReLU.apply(self.pre_acts(x), self.threshold, self.bandwidth)

    def _forward(self, x: torch.Tensor) -> ForwardOutput:
        pre_nk, threshold = self.pre_acts(x), self.threshold
        codes = _JumpReLU.apply(pre_nk, threshold, self.bandwidth)
        x_hat = self._decode(codes)
        recon = normalized_mse(x_hat, x)
        l0 = _Step.apply(pre_nk, threshold, self.bandwidth).sum(dim=-1).mean()
        sparsity = self.sparsity_coeff * self.sparsity_warmup * l0
        return ForwardOutput(
            x_hat=x_hat,
            codes=codes,
            loss=recon + sparsity,
            recon_loss=recon,
            sparsity_loss=sparsity,
        )
