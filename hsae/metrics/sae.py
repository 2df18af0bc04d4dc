"""Reconstruction and sparsity metrics of an SAE, as torchmetrics ``Metric``s.

Each accumulates sums over every row it sees and reduces them across DDP ranks with
``sum``, so a metric computed on N ranks equals the metric computed on all rows at once.
All take ``update(x, x_hat, codes)``. Names (the keys of ``make_sae_metrics``) are the
documented ones: see docs/metrics.md.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection


class MSE(Metric):
    """Mean squared error per element, over every row and dimension."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("sse", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_elements", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        self.sse += (x_hat.double() - x.double()).pow(2).sum()
        self.n_elements += x.numel()

    def compute(self) -> torch.Tensor:
        return (self.sse / self.n_elements).float()


class FVU(Metric):
    """Fraction of variance unexplained: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``,
    the mean taken over every row seen (0 = perfect, 1 = no better than the mean)."""

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


class L0(Metric):
    """Mean number of active (non-zero) latents per row."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("n_active", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_rows", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        self.n_active += (codes != 0).sum()
        self.n_rows += codes.shape[0]

    def compute(self) -> torch.Tensor:
        return self.n_active.double().div(self.n_rows).float()


class DeadFraction(Metric):
    """Fraction of latents that never fired on any row seen."""

    full_state_update = False

    def __init__(self, n_latents: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("fire_count", torch.zeros(n_latents, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        self.fire_count += (codes != 0).sum(dim=0)

    def compute(self) -> torch.Tensor:
        return (self.fire_count == 0).float().mean()


def make_sae_metrics(d_model: int, n_latents: int, prefix: str = "") -> MetricCollection:
    return MetricCollection(
        {
            "mse": MSE(),
            "fvu": FVU(d_model),
            "l0": L0(),
            "dead_fraction": DeadFraction(n_latents),
        },
        prefix=prefix,
        compute_groups=False,
    )
