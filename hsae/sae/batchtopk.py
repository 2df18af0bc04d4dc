"""BatchTopK sparse autoencoder.

Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders" (arXiv:2412.06410): during
training keep the ``k × n`` largest ReLU'd pre-activations of the whole batch, so the
average L0 is ``k`` but each row takes as many latents as it needs. At inference a row must
not depend on its batch, so a single threshold ``theta`` replaces the batch selection:
``theta`` is the running average (an exponential moving average) of the smallest
activation the batch selection kept, and in eval mode a latent fires where its
pre-activation exceeds it. Everything else as TopK (Gao et al. 2024): ``b_pre``, unit-norm
decoder rows, encoder initialised as the decoder's transpose, AuxK for dead latents.

The running average follows the encoder with a lag, and a short run's average still holds
its first batches (momentum 0.01 over 161 steps left the default Matryoshka run at an eval
L0 of 6.7 for k = 16). So at the end of each epoch hsae's trainer calibrates it
(``calibrate``): ``theta`` is set so that, on a sample of training rows, the mean L0 in
eval mode is exactly ``k`` (the threshold the batch selection would use on those rows
taken as one batch). The study compares SAEs at matched L0; this makes ``k`` mean it.
"""

from __future__ import annotations

import torch

from hsae.config import SAEConfig
from hsae.sae.base import (
    batch_topk_codes,
    check_fraction,
    global_min,
)
from hsae.sae.sparse import batch_topk_indices
from hsae.sae.topk import TopKSAE


class ThresholdMixin:
    """The inference threshold of BatchTopK, shared with Matryoshka's BatchTopK inside."""

    threshold: torch.Tensor
    n_threshold_updates: torch.Tensor
    threshold_momentum: float
    training: bool

    def _init_threshold(self) -> None:
        check_fraction("threshold_momentum", self.threshold_momentum, open_low=True)
        self.register_buffer("threshold", torch.zeros(()))  # type: ignore[attr-defined]
        self.register_buffer("n_threshold_updates", torch.zeros((), dtype=torch.long))  # type: ignore[attr-defined]

    @torch.no_grad()
    def _update_threshold(self, codes_nk: torch.Tensor) -> None:
        positive = codes_nk.masked_fill(codes_nk <= 0, float("inf"))
        # Under DDP, the global batch's smallest (every rank takes part, even with none).
        smallest = global_min(positive.min()).to(self.threshold.dtype)
        if not torch.isfinite(smallest):  # nothing kept was positive
            return
        if self.n_threshold_updates == 0:
            # The first estimate starts the average, rather than being pulled towards 0.
            self.threshold.copy_(smallest)
        else:
            self.threshold.lerp_(smallest, self.threshold_momentum)
        self.n_threshold_updates.add_(1)

    @torch.no_grad()
    def calibrate_threshold(self, rows_nd: torch.Tensor, max_elements: int = 1 << 24) -> float:
        """Set ``threshold`` so that in eval mode ``k`` latents fire per row on average over
        ``rows_nd`` (input units): midway between the ``k n``-th and ``k n + 1``-th largest
        positive pre-activation, so exactly ``k n`` exceed it (barring ties). Fewer than
        ``k n + 1`` positive ones: 0, every positive pre-activation fires. Returns it.

        One pass, in chunks of at most ``max_elements`` pre-activations, keeping only the
        ``k n + 1`` largest seen so far."""
        k = self.k  # type: ignore[attr-defined]
        n_latents = self.n_latents  # type: ignore[attr-defined]
        n_keep = k * rows_nd.shape[0] + 1
        step = max(1, max_elements // n_latents)
        best = self.threshold.new_empty(0)
        for start in range(0, rows_nd.shape[0], step):
            x = rows_nd[start : start + step].to(best.dtype) / self.input_scale  # type: ignore[attr-defined]
            pre = self.pre_acts(x).flatten()  # type: ignore[attr-defined]
            # Only values above the smallest kept (or above 0) can enter the top k n + 1.
            floor = best.min() if len(best) == n_keep else best.new_zeros(())
            best = torch.cat([best, pre[pre > floor]])
            if len(best) > n_keep:
                best = best.topk(n_keep, sorted=False).values
        if len(best) < n_keep:
            value = 0.0
        else:
            last_two = best.topk(2, largest=False).values  # the (k n + 1)-th, then k n-th
            value = float(last_two.mean())
        self.threshold.fill_(value)
        # An SAE calibrated before any training step uses the threshold too.
        self.n_threshold_updates.clamp_(min=1)
        return value

    def needs_calibration(self) -> bool:
        return True

    def calibrate(self, rows_nd: torch.Tensor) -> None:
        self.calibrate_threshold(rows_nd)

    def _sparsify(self, pre_nk: torch.Tensor, k: int) -> torch.Tensor:
        """Batch top-k while training (updating the threshold); the threshold in eval mode.

        An SAE that never trained has no threshold yet; it keeps the batch top-k then, so
        it still obeys its L0 budget instead of firing every positive latent.
        """
        if self.training or self.n_threshold_updates == 0:
            codes = batch_topk_codes(pre_nk, k)
            if self.training:
                self._update_threshold(codes)
            return codes
        return pre_nk * (pre_nk > self.threshold.clamp_min(0))


class BatchTopKSAE(ThresholdMixin, TopKSAE):
    arch = "batchtopk"

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        k: int,
        k_aux: int | None = SAEConfig.k_aux,  # defaults: hsae.config.SAEConfig
        aux_coeff: float = SAEConfig.aux_coeff,
        dead_tokens_threshold: int | None = None,
        threshold_momentum: float = SAEConfig.threshold_momentum,
    ):
        super().__init__(d_model, n_latents, k, k_aux, aux_coeff, dead_tokens_threshold)
        self.threshold_momentum = threshold_momentum
        self._init_threshold()

    def _dense_codes(self, pre_nk: torch.Tensor) -> torch.Tensor:
        return self._sparsify(pre_nk, self.k)

    def _use_sparse(self) -> bool:
        # The batch selection runs sparse; the inference threshold is a dense comparison.
        return self.sparse_kernels and (self.training or self.n_threshold_updates == 0)

    def _sparse_selection(self, pre_nk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return batch_topk_indices(pre_nk, self.k)

    def _observe_codes(self, codes_nk: torch.Tensor) -> None:
        self._update_threshold(codes_nk)
