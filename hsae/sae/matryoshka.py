"""Matryoshka sparse autoencoder.

Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level Features with Matryoshka
Sparse Autoencoders" (arXiv:2503.17547), and Nabeshima 2024, "Matryoshka Sparse
Autoencoders" (LessWrong). The latents are ordered and split into nested groups; each
prefix of groups must reconstruct the input on its own, so the first latents learn general
(parent-like) features that do not lean on later, more specific ones, which counters feature
absorption. The codes come from one TopK or BatchTopK selection over the whole dictionary
(``activation``); prefix ``m`` reconstructs ``x`` as ``b_pre + sum_{i < m} f_i W_dec,i``
and the loss is the mean over prefixes of their normalised squared errors.

Prefixes are either fixed, the ends of the groups ``group_fractions`` (Bussmann et al.),
or, with ``n_random_prefixes > 0``, that many prefix lengths drawn log-uniformly at each
training step plus the full width (Nabeshima samples prefixes at random); in eval mode the
fixed groups always give the loss, so validation losses compare across steps. Everything
else as TopK/BatchTopK: ``b_pre``, unit-norm decoder rows, encoder initialised as the
decoder's transpose, AuxK for dead latents.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hsae.config import MATRYOSHKA_GROUP_FRACTIONS, SAEConfig
from hsae.errors import HsaeError
from hsae.sae.base import topk_codes
from hsae.sae.batchtopk import ThresholdMixin
from hsae.sae.sparse import batch_topk_indices, sparse_decode
from hsae.sae.topk import TopKSAE

ACTIVATIONS = ("batchtopk", "topk")


def group_ends(group_fractions: Sequence[float], n_latents: int) -> list[int]:
    """End (exclusive) of each group's latents; the last is ``n_latents``."""
    fractions = [float(f) for f in group_fractions]
    if not fractions or any(not f > 0 for f in fractions):
        raise HsaeError(f"sae.group_fractions={fractions} must be a non-empty list of numbers > 0")
    if abs(sum(fractions) - 1) > 1e-6:
        raise HsaeError(
            f"sae.group_fractions={fractions} sums to {sum(fractions):.6g}; the groups must "
            "share out the whole dictionary (sum to 1)"
        )
    ends, total = [], 0.0
    for fraction in fractions:
        total += fraction
        ends.append(round(total * n_latents))
    ends[-1] = n_latents
    if any(b <= a for a, b in zip([0, *ends], ends, strict=False)):
        raise HsaeError(
            f"sae.group_fractions={fractions} leaves an empty group at sae.n_latents={n_latents}; "
            "use fewer or larger groups, or more latents"
        )
    return ends


class MatryoshkaSAE(ThresholdMixin, TopKSAE):
    arch = "matryoshka"

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        k: int,
        # Defaults (and why): hsae.config.SAEConfig, the one place they are written.
        group_fractions: Sequence[float] = MATRYOSHKA_GROUP_FRACTIONS,
        n_random_prefixes: int = SAEConfig.n_random_prefixes,
        activation: str = SAEConfig.activation,
        k_aux: int | None = SAEConfig.k_aux,
        aux_coeff: float = SAEConfig.aux_coeff,
        dead_tokens_threshold: int | None = None,
        threshold_momentum: float = SAEConfig.threshold_momentum,
    ):
        if activation not in ACTIVATIONS:
            raise HsaeError(
                f"sae.activation={activation!r} is not valid for matryoshka; choose one of: "
                f"{', '.join(ACTIVATIONS)}"
            )
        if not isinstance(n_random_prefixes, int) or n_random_prefixes < 0:
            raise HsaeError(
                f"sae.n_random_prefixes={n_random_prefixes!r} must be an integer >= 0 "
                "(0 = the fixed groups of sae.group_fractions)"
            )
        super().__init__(d_model, n_latents, k, k_aux, aux_coeff, dead_tokens_threshold)
        self.group_fractions = tuple(float(f) for f in group_fractions)
        self.ends = group_ends(self.group_fractions, n_latents)
        self.n_random_prefixes, self.activation = n_random_prefixes, activation
        self.threshold_momentum = threshold_momentum
        if activation == "batchtopk":
            self._init_threshold()

    def _dense_codes(self, pre_nk: torch.Tensor) -> torch.Tensor:
        if self.activation == "topk":
            return topk_codes(pre_nk, self.k)
        return self._sparsify(pre_nk, self.k)

    def prefix_ends(self) -> list[int]:
        """Widths of the prefixes that reconstruct on their own at this step."""
        if not self.training or self.n_random_prefixes == 0 or self.n_latents == 1:
            return list(self.ends)
        # Log-uniform lengths in 1..n_latents-1: small prefixes, the general features, get as
        # many draws per octave as large ones.
        log_n = math.log(self.n_latents)
        draws = (torch.rand(self.n_random_prefixes) * log_n).exp().floor().long()
        lengths = draws.clamp(1, self.n_latents - 1).tolist()
        return sorted({*lengths, self.n_latents})

    def reconstruct_prefixes(self, codes: torch.Tensor, ends: Sequence[int]) -> list[torch.Tensor]:
        """``[n, d]`` reconstruction (normalised units) of each prefix ``codes[:, :end]``, for
        each of ``ends`` (increasing), built group by group so each costs only its new
        latents."""
        recons, partial, start = [], self.b_pre.expand(codes.shape[0], -1), 0
        for end in ends:
            partial = partial + codes[:, start:end] @ self.W_dec[start:end]
            recons.append(partial)
            start = end
        return recons

    def _use_sparse(self) -> bool:
        if self.activation == "topk":
            return self.sparse_kernels
        return self.sparse_kernels and (self.training or self.n_threshold_updates == 0)

    def _sparse_selection(self, pre_nk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.activation == "topk":
            return super()._sparse_selection(pre_nk)
        return batch_topk_indices(pre_nk, self.k)

    def _sparse_reconstructions(
        self, values_na: torch.Tensor, indices_na: torch.Tensor
    ) -> list[torch.Tensor]:
        # Prefix m keeps the active latents below m: the same k decoder rows per input row,
        # masked, instead of a dense product per group.
        return [
            sparse_decode(values_na * (indices_na < end), indices_na, self.W_dec) + self.b_pre
            for end in self.prefix_ends()
        ]

    def needs_calibration(self) -> bool:
        return self.activation == "batchtopk"  # TopK inside needs no threshold

    def calibrate(self, rows_nd: torch.Tensor) -> None:
        if self.needs_calibration():
            self.calibrate_threshold(rows_nd)

    def _observe_codes(self, codes_nk: torch.Tensor) -> None:
        if self.activation == "batchtopk":
            self._update_threshold(codes_nk)

    def _dense_reconstructions(self, codes: torch.Tensor) -> list[torch.Tensor]:
        return self.reconstruct_prefixes(codes, self.prefix_ends())
