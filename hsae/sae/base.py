"""What every SAE architecture shares: its output type and the decoder-geometry helpers."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class ForwardOutput(NamedTuple):
    x_hat: torch.Tensor
    """``[n, d]`` reconstruction of the input."""
    codes: torch.Tensor
    """``[n, n_latents]`` latent activations (zero where a latent is off)."""
    loss: torch.Tensor
    """Scalar the optimiser minimises (``recon_loss`` plus any architecture terms)."""
    recon_loss: torch.Tensor
    """Squared error normalised by the batch's variance (the batch's FVU)."""


def normalized_mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error over the batch's total variance: scale-free, so one learning rate and
    one loss curve read the same across backbones and layers."""
    variance = (x - x.mean(dim=0)).pow(2).sum(dim=-1).mean()
    return (x_hat - x).pow(2).sum(dim=-1).mean() / variance.clamp_min(1e-12)


@torch.no_grad()
def geometric_median(points_nd: torch.Tensor, n_iter: int = 100, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    points = points_nd.double()
    median = points.mean(dim=0)
    for _ in range(n_iter):
        weights = 1.0 / (points - median).norm(dim=-1).clamp_min(eps)
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (new - median).norm() < eps * (1 + median.norm()):
            median = new
            break
        median = new
    return median.to(points_nd.dtype)


class UnitNormDecoderMixin:
    """Decoder rows (one per latent) kept at unit norm: renormalise after each optimiser
    step, and drop the gradient component along each row before it, so Adam's steps move
    directions, not lengths."""

    W_dec: nn.Parameter

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        if self.W_dec.grad is None:
            return
        unit = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        parallel = (self.W_dec.grad * unit).sum(dim=-1, keepdim=True)
        self.W_dec.grad.sub_(parallel * unit)
