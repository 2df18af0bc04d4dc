"""What every SAE architecture shares: its output type, the base class, the decoder-geometry
helpers, the sparsifying activations and the AuxK loss for dead latents."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from hsae.errors import HsaeError


class ForwardOutput(NamedTuple):
    x_hat: torch.Tensor
    """``[n, d]`` reconstruction of the input."""
    codes: torch.Tensor
    """``[n, n_latents]`` latent activations (zero where a latent is off)."""
    loss: torch.Tensor
    """Scalar the optimiser minimises: ``recon_loss + aux_loss + sparsity_loss`` (Matryoshka
    puts the mean of its prefix losses in place of ``recon_loss``)."""
    recon_loss: torch.Tensor
    """Squared error normalised by the batch's variance (the batch's FVU)."""
    aux_loss: torch.Tensor | None = None
    """Auxiliary term as added to ``loss`` (AuxK, gated's frozen-decoder reconstruction,
    H-SAE's parents-only reconstruction); None where there is none this step."""
    sparsity_loss: torch.Tensor | None = None
    """Sparsity penalty as added to ``loss`` (L1 or L0, coefficient and warm-up applied)."""


def batch_variance(x: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of a row to the batch mean (the denominator of the FVU)."""
    return (x - x.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-12)


def normalized_mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error over the batch's total variance: scale-free, so one learning rate and
    one loss curve read the same across backbones and layers."""
    return (x_hat - x).pow(2).sum(dim=-1).mean() / batch_variance(x)


def l1_scale(x: torch.Tensor) -> torch.Tensor:
    """Divisor that puts an L1 term on the scale of Anthropic's April 2024 recipe.

    There inputs are normalised to ``E||x||^2 = d`` and the loss is ``||x - x_hat||^2 +
    lambda * L1``. Dividing that loss by ``d`` makes its first term our ``normalized_mse``
    and its second ``lambda * L1_raw / sqrt(d * variance)``: so ``l1_coeff`` keeps the
    meaning (and the typical value, ~5) it has in their recipe on any activation scale.
    """
    return (x.shape[-1] * batch_variance(x)).sqrt()


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


def topk_codes(pre_nl: torch.Tensor, k: int) -> torch.Tensor:
    """Per row: keep the ``k`` largest pre-activations, ReLU them, zero the rest."""
    top = pre_nl.topk(min(k, pre_nl.shape[-1]), dim=-1, sorted=False)
    return torch.zeros_like(pre_nl).scatter_(-1, top.indices, top.values.relu())


def batch_topk_codes(pre_nl: torch.Tensor, k: int) -> torch.Tensor:
    """Over the whole batch: keep the ``k * n`` largest ReLU'd pre-activations, so rows share
    one budget and a hard row may take more latents than an easy one."""
    acts = pre_nl.relu().flatten()
    top = acts.topk(min(k * pre_nl.shape[0], acts.numel()), sorted=False)
    return torch.zeros_like(acts).scatter_(0, top.indices, top.values).view_as(pre_nl)


def check_positive_int(name: str, value: int, fix: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HsaeError(f"sae.{name}={value!r} must be a positive integer{fix}")


def check_fraction(name: str, value: float, *, open_low: bool = False) -> None:
    low_ok = value > 0 if open_low else value >= 0
    if not (low_ok and value <= 1):
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise HsaeError(f"sae.{name}={value!r} must be in {interval}")


def check_k(k: int, n_latents: int, what: str = "sae.n_latents") -> None:
    if not isinstance(k, int) or not 0 < k <= n_latents:
        raise HsaeError(f"sae.k={k!r} must be in 1..{what} ({n_latents}); lower sae.k")


class SparseAutoencoder(nn.Module):
    """Base of every architecture: the config that rebuilds it, the direction each latent
    writes, and the pre-encoder bias ``b_pre`` centred on the data."""

    arch: ClassVar[str]
    d_model: int
    n_latents: int
    b_pre: nn.Parameter
    W_dec: nn.Parameter

    def config(self) -> dict[str, Any]:
        """Constructor arguments: with the state dict, all that rebuilds this SAE.

        Read from the attributes named like the ``__init__`` parameters, so a new
        hyperparameter cannot be forgotten here (it is a JSON dict: tuples become lists).
        """
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        config: dict[str, Any] = {"arch": self.arch}
        for name in names:
            value = getattr(self, name)
            config[name] = list(value) if isinstance(value, tuple) else value
        return config

    def decoder_rows(self) -> torch.Tensor:
        """``[n_latents, d]``: the direction each latent adds to the reconstruction."""
        return self.W_dec

    @torch.no_grad()
    def init_b_pre(self, sample_nd: torch.Tensor, method: str = "geometric_median") -> None:
        """Centre the encoder on the data: the geometric median is robust to outlier rows."""
        if method == "geometric_median":
            self.b_pre.copy_(geometric_median(sample_nd.float()))
        elif method == "mean":
            self.b_pre.copy_(sample_nd.float().mean(dim=0))
        elif method == "zeros":
            self.b_pre.zero_()
        else:
            raise HsaeError(
                f"b_pre init method={method!r} is not known; valid: geometric_median, mean, zeros"
            )


class UnitNormDecoderMixin:
    """Decoder rows (one per latent) kept at unit norm: renormalise after each optimiser
    step, and drop the gradient component along each row before it, so Adam's steps move
    directions, not lengths. ``unit_norm_decoders`` names the parameters whose last axis is
    a row in input space."""

    unit_norm_decoders: ClassVar[tuple[str, ...]] = ("W_dec",)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        for name in self.unit_norm_decoders:
            weight = getattr(self, name)
            weight.div_(weight.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        for name in self.unit_norm_decoders:
            weight = getattr(self, name)
            if weight.grad is None:
                continue
            unit = weight / weight.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            parallel = (weight.grad * unit).sum(dim=-1, keepdim=True)
            weight.grad.sub_(parallel * unit)


class AuxKMixin:
    """AuxK loss of Gao et al. 2024 ("Scaling and evaluating sparse autoencoders", §A.2).

    A buffer counts the training rows since each tracked latent last fired; a latent is dead
    once that reaches ``dead_tokens_threshold``. The dead latents' ``k_aux`` largest
    pre-activations then reconstruct the main reconstruction's residual, which gives dead
    latents a gradient towards what the live ones miss. ``k_aux=None`` means ``d_model // 2``
    (the paper's 512 for d=768, roughly).
    """

    d_model: int
    k_aux: int | None
    aux_coeff: float
    dead_tokens_threshold: int
    rows_since_fired: torch.Tensor
    training: bool

    def _init_auxk(self, n_tracked: int) -> None:
        if self.k_aux is not None:
            check_positive_int("k_aux", self.k_aux, " (or None for d_model // 2)")
        if not self.aux_coeff >= 0:
            raise HsaeError(f"sae.aux_coeff={self.aux_coeff!r} must be >= 0 (0 turns AuxK off)")
        check_positive_int("dead_tokens_threshold", self.dead_tokens_threshold)
        self.register_buffer("rows_since_fired", torch.zeros(n_tracked, dtype=torch.long))  # type: ignore[attr-defined]

    def dead_latents(self) -> torch.Tensor:
        """``[n_tracked]`` bool: latents that fired on none of the last threshold rows."""
        return self.rows_since_fired >= self.dead_tokens_threshold

    @torch.no_grad()
    def _update_fired(self, codes_nl: torch.Tensor) -> None:
        fired = (codes_nl != 0).any(dim=0)
        self.rows_since_fired.add_(codes_nl.shape[0]).masked_fill_(fired, 0)

    def _auxk_loss(
        self,
        pre_nl: torch.Tensor,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        dead_l: torch.Tensor,
        W_dec: torch.Tensor,
    ) -> torch.Tensor | None:
        """Weighted AuxK term, or None when nothing is dead (the loss is then unchanged)."""
        n_dead = int(dead_l.sum())
        if not self.training or n_dead == 0 or self.aux_coeff == 0:
            return None
        k_aux = min(self.k_aux or max(1, self.d_model // 2), n_dead)
        top = pre_nl.masked_fill(~dead_l, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        aux_codes = torch.zeros_like(pre_nl).scatter_(-1, top.indices, top.values.relu())
        # The residual is a target, not a path: AuxK trains only the dead latents.
        residual = (x - x_hat).detach()
        return self.aux_coeff * normalized_mse(aux_codes @ W_dec, residual)


def warmup_scale(step: int, total_steps: int, fraction: float) -> float:
    """Linear ramp from 0 to 1 over the first ``fraction`` of training (1 when fraction=0)."""
    ramp = fraction * total_steps
    return 1.0 if ramp <= 0 else min(1.0, step / ramp)
