"""Reconstruction and sparsity metrics of an SAE, as torchmetrics ``Metric``s.

Each accumulates sums over every row it sees and reduces them across DDP ranks with
``sum``, so a metric computed on N ranks equals the metric computed on all rows at once.
All take ``update(x, x_hat, codes)``. Names (the keys of ``make_sae_metrics``) are the
documented ones: see docs/metrics.md.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
from torchmetrics import Metric, MetricCollection

from hsae.errors import HsaeError
from hsae.sae.base import SparseAutoencoder


class _RowMean(Metric):
    """A total over every row seen divided by a count (of rows or elements), both summed
    across DDP ranks: subclasses say what a batch adds to each (``_terms``)."""

    total: torch.Tensor
    count: torch.Tensor

    full_state_update = False
    total_dtype: ClassVar[torch.dtype] = torch.float64

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0, dtype=self.total_dtype), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @abstractmethod
    def _terms(
        self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor
    ) -> tuple[torch.Tensor, int | torch.Tensor]:
        """What one batch adds to ``(total, count)``."""

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        total, count = self._terms(x, x_hat, codes)
        self.total += total
        self.count += count

    def compute(self) -> torch.Tensor:
        return self.total.double().div(self.count).float()


class MSE(_RowMean):
    """Mean squared error per element, over every row and dimension."""

    def _terms(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor):
        return (x_hat.double() - x.double()).pow(2).sum(), x.numel()


class FVU(Metric):
    """Fraction of variance unexplained: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``,
    the mean taken over every row seen (0 = perfect, 1 = no better than the mean)."""

    sse: torch.Tensor
    sum_x: torch.Tensor
    sum_sq: torch.Tensor
    n_rows: torch.Tensor

    full_state_update = False

    def __init__(self, d_model: int, **kwargs):
        super().__init__(**kwargs)
        f64 = torch.float64
        self.add_state("sse", torch.tensor(0.0, dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_model, dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_sq", torch.tensor(0.0, dtype=f64), dist_reduce_fx="sum")
        self.add_state("n_rows", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        x64 = x.double()
        self.sse += (x_hat.double() - x64).pow(2).sum()
        self.sum_x += x64.sum(dim=0)
        self.sum_sq += x64.pow(2).sum()
        self.n_rows += x.shape[0]

    def compute(self) -> torch.Tensor:
        # Total variance from sums: sum ||x||^2 - n ||mean||^2 (float64 keeps it exact enough).
        total = self.sum_sq - self.sum_x.pow(2).sum() / self.n_rows
        return (self.sse / total.clamp_min(1e-30)).float()


class L0(_RowMean):
    """Mean number of active (non-zero) latents per row."""

    total_dtype = torch.long

    def _terms(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor):
        return (codes != 0).sum(), codes.shape[0]


class FeatureDensity(Metric):
    """``[n_latents]`` fraction of rows on which each latent fires: a histogram to log (on a
    log scale), not a scalar, so it stays out of ``make_sae_metrics``. Its subclasses read
    one scalar off the same firing counts."""

    fire_count: torch.Tensor
    n_rows: torch.Tensor

    full_state_update = False

    def __init__(self, n_latents: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("fire_count", torch.zeros(n_latents, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_rows", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        self.fire_count += (codes != 0).sum(dim=0)
        self.n_rows += codes.shape[0]

    def compute(self) -> torch.Tensor:
        return self.fire_count.double().div(self.n_rows).float()


class DeadFraction(FeatureDensity):
    """Fraction of latents that never fired on any row seen."""

    def compute(self) -> torch.Tensor:
        return (self.fire_count == 0).float().mean()


class L1(_RowMean):
    """Mean L1 norm of the codes per row (the raw penalty a ReLU SAE pays, unweighted)."""

    def _terms(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor):
        return codes.double().abs().sum(), codes.shape[0]


DENSE_THRESHOLD = 0.1  # a latent on more than 10% of rows is too common to read as a feature


class DenseFraction(FeatureDensity):
    """Fraction of latents that fire on more than 10% of the rows seen."""

    def compute(self) -> torch.Tensor:
        return (self.fire_count > DENSE_THRESHOLD * self.n_rows).float().mean()


class Shrinkage(_RowMean):
    """Mean over rows of ``||x_hat|| / ||x||``: 1 when reconstructions keep the input's
    norm, below 1 when a sparsity penalty shrinks them (L1 SAEs), above 1 when they
    overshoot. The norms are of the vectors as the SAE sees them (no bias removed), since
    an ``update`` sees only ``x``, ``x_hat`` and the codes; rows with ``x = 0`` are skipped."""

    def _terms(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor):
        x_norm = x.double().norm(dim=-1)
        keep = x_norm > 0
        return (x_hat.double().norm(dim=-1)[keep] / x_norm[keep]).sum(), keep.sum()


def max_decoder_cosine(
    sae: SparseAutoencoder | torch.Tensor, chunk_rows: int = 4096
) -> torch.Tensor:
    """Largest ``|cosine|`` between two distinct decoder rows (1 = two latents write the same
    direction). A function of the SAE, not of data: takes the SAE (its ``decoder_rows()``)
    or a ``[n_latents, d]`` tensor. Works in blocks of ``chunk_rows`` so a 100k-latent
    dictionary never builds its full Gram matrix."""
    rows = sae if isinstance(sae, torch.Tensor) else sae.decoder_rows()
    rows = rows.detach().float()
    unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n = unit.shape[0]
    if n < 2:
        raise HsaeError(f"max_decoder_cosine needs an SAE with at least 2 latents, got {n}")
    best = torch.tensor(0.0, device=unit.device)
    for start in range(0, n, chunk_rows):
        cos = (unit[start : start + chunk_rows] @ unit.T).abs()
        block = torch.arange(cos.shape[0], device=unit.device)
        cos[block, block + start] = 0.0  # a row with itself
        best = torch.maximum(best, cos.max())
    return best


def make_sae_metrics(d_model: int, n_latents: int, prefix: str = "") -> MetricCollection:
    """The scalar SAE metrics, keyed by their documented names."""
    return MetricCollection(
        {
            "mse": MSE(),
            "fvu": FVU(d_model),
            "l0": L0(),
            "l1": L1(),
            "dead_fraction": DeadFraction(n_latents),
            "dense_fraction": DenseFraction(n_latents),
            "shrinkage": Shrinkage(),
        },
        prefix=prefix,
        compute_groups=False,
    )
