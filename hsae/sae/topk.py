"""TopK sparse autoencoder.

Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (arXiv:2406.04093): keep the
``k`` largest pre-activations of each row, ReLU them, zero the rest. Pre-encoder bias
``b_pre`` subtracted before encoding and added back after decoding; decoder rows at unit
norm; the encoder initialised as the decoder's transpose; the AuxK loss (§A.2) revives dead
latents by having them reconstruct what the live ones miss.

``sparse_kernels`` (on by default) computes the same step with ``hsae.sae.sparse``: one
dense product (the encoder's forward) instead of five, the rest over the ``k`` active
latents only; ``False`` runs the plain dense reference.
"""

from __future__ import annotations

import torch
from torch import nn

from hsae.config import SAEConfig
from hsae.sae.auxk import AuxKMixin
from hsae.sae.base import (
    ForwardOutput,
    SparseAutoencoder,
    UnitNormDecoderMixin,
    batch_variance,
    check_k,
    check_positive_int,
    normalized_mse,
    topk_codes,
)
from hsae.sae.sparse import gathered_pre_acts, sparse_decode


class TopKSAE(UnitNormDecoderMixin, AuxKMixin, SparseAutoencoder):
    arch = "topk"
    W_enc: nn.Parameter
    b_enc: nn.Parameter
    sparse_kernels: bool = True
    """Train with the sparse kernels (same results as the dense step, up to rounding)."""

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        k: int,
        # Defaults (and why): hsae.config.SAEConfig, the one place they are written.
        k_aux: int | None = SAEConfig.k_aux,
        aux_coeff: float = SAEConfig.aux_coeff,
        # Rows; None: no latent counts as dead until the trainer sets the window (AuxKMixin).
        dead_tokens_threshold: int | None = None,
    ):
        super().__init__()
        check_positive_int("n_latents", n_latents)
        check_k(k, n_latents)
        self.d_model, self.n_latents, self.k = d_model, n_latents, k
        self.k_aux, self.aux_coeff = k_aux, aux_coeff
        self.dead_tokens_threshold = dead_tokens_threshold
        self._declare_parameters(d_model, n_latents)
        self._init_auxk(n_latents)
        self.reset_parameters()

    def l0_target(self) -> int | None:
        return self.k

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations of ``x`` in normalised units (``x / input_scale``)."""
        return torch.addmm(self.b_enc, x - self.b_pre, self.W_enc)

    def _dense_codes(self, pre_nk: torch.Tensor) -> torch.Tensor:
        """Codes from pre-activations (BatchTopK: its batch selection or threshold)."""
        return topk_codes(pre_nk, self.k)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._dense_codes(self.pre_acts(x))

    def _forward(self, x: torch.Tensor) -> ForwardOutput:
        return self._forward_sparse(x) if self._use_sparse() else self._forward_dense(x)

    # ---- the sparse step; BatchTopK and Matryoshka reuse it with their own selection ----

    def _use_sparse(self) -> bool:
        return self.sparse_kernels

    def _sparse_selection(self, pre_nk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[n, a]`` indices of each row's active latents, and a mask of the real entries
        when rows are padded to one width (None: all real)."""
        return pre_nk.topk(min(self.k, self.n_latents), dim=-1, sorted=False).indices, None

    def _sparse_reconstructions(
        self, values_na: torch.Tensor, indices_na: torch.Tensor
    ) -> list[torch.Tensor]:
        """Reconstructions the loss averages over (the full one last)."""
        return [sparse_decode(values_na, indices_na, self.W_dec) + self.b_pre]

    def _observe_codes(self, codes_nk: torch.Tensor) -> None:
        """Training-time statistics of the selected codes (BatchTopK's threshold)."""

    def _forward_sparse(self, x: torch.Tensor) -> ForwardOutput:
        dead_k = self.dead_latents()
        with torch.no_grad():  # the one dense product; gradients come from gathered_pre_acts
            pre_nk = self.pre_acts(x)
            indices, mask = self._sparse_selection(pre_nk)
            aux_indices = self._auxk_indices(pre_nk, dead_k)
            both = indices if aux_indices is None else torch.cat([indices, aux_indices], dim=1)
        acts = gathered_pre_acts(x, self.b_pre, self.W_enc, self.b_enc, both, pre_nk).relu()
        width = indices.shape[1]
        values = acts[:, :width] if mask is None else acts[:, :width] * mask
        recons = self._sparse_reconstructions(values, indices)
        x_hat = recons[-1]
        recon, main = self._recon_losses(recons, x)
        aux = None
        if aux_indices is not None:
            aux_recon = sparse_decode(acts[:, width:], aux_indices, self.W_dec)
            aux = self.aux_coeff * normalized_mse(aux_recon, (x - x_hat).detach())
        with torch.no_grad():
            # The pre-activations are spent (gathered): their memory takes the codes. And
            # scatter_add, as padding entries (index 0, value 0) must not overwrite latent 0.
            codes = pre_nk.zero_().scatter_add_(-1, indices, values.to(pre_nk.dtype))
            if self.training:
                # Static shapes (no boolean indexing), so torch.compile keeps one graph.
                hits = torch.zeros(self.n_latents, dtype=torch.int32, device=x.device)
                hits.index_add_(0, indices.reshape(-1), (values > 0).reshape(-1).int())
                self._mark_fired(hits > 0, x.shape[0])
                self._observe_codes(codes)
        loss = main if aux is None else main + aux
        return ForwardOutput(x_hat=x_hat, codes=codes, loss=loss, recon_loss=recon, aux_loss=aux)

    def _recon_losses(
        self, recons: list[torch.Tensor], x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(recon, main)``: the full reconstruction's loss, and the mean over ``recons``
        (Matryoshka's prefixes; the same as ``recon`` for one)."""
        # One variance for every prefix (under DDP each is an all-reduce).
        variance = batch_variance(x)
        losses = [normalized_mse(r, x, variance) for r in recons]
        recon = losses[-1]
        return recon, recon if len(losses) == 1 else torch.stack(losses).mean()

    def _dense_reconstructions(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """The dense step's reconstructions the loss averages over (the full one last)."""
        return [self._decode(codes)]

    def _forward_dense(self, x: torch.Tensor) -> ForwardOutput:
        dead_k = self.dead_latents()
        pre_nk = self.pre_acts(x)
        codes = self._dense_codes(pre_nk)
        recons = self._dense_reconstructions(codes)
        x_hat = recons[-1]
        recon, main = self._recon_losses(recons, x)
        aux = self._auxk_loss(pre_nk, x, x_hat, dead_k, self.W_dec)
        if self.training:
            self._update_fired(codes)
        loss = main if aux is None else main + aux
        return ForwardOutput(x_hat=x_hat, codes=codes, loss=loss, recon_loss=recon, aux_loss=aux)
