"""The AuxK loss for dead latents (TopK-family SAEs): which latents are dead, and the term
that gives them a gradient towards what the live ones miss."""

from __future__ import annotations

import torch
import torch.distributed as dist

from hsae.errors import HsaeError
from hsae.sae.base import _GLOBAL_BATCH, check_positive_int, normalized_mse


class AuxKMixin:
    """AuxK loss of Gao et al. 2024 ("Scaling and evaluating sparse autoencoders", §A.2).

    A buffer counts the training rows since each tracked latent last fired; a latent is dead
    once that reaches ``dead_tokens_threshold``. The dead latents' ``k_aux`` largest
    pre-activations then reconstruct the main reconstruction's residual, which gives dead
    latents a gradient towards what the live ones miss. ``k_aux=None`` means ``d_model // 2``
    (the paper's 512 for d=768, roughly).

    ``dead_tokens_threshold=None`` (the architectures' default) counts no latent as dead:
    the window depends on how long the SAE trains, so whoever trains it sets it. hsae's
    trainer does, from ``sae.dead_epoch_fraction`` of an epoch's rows unless
    ``sae.dead_tokens_threshold`` is given (``SAEConfig.dead_rows``): a fixed number of rows
    larger than a short run never switches AuxK on.
    """

    d_model: int
    k_aux: int | None
    aux_coeff: float
    dead_tokens_threshold: int | None
    rows_since_fired: torch.Tensor
    training: bool

    def _init_auxk(self, n_tracked: int) -> None:
        if self.k_aux is not None:
            check_positive_int("k_aux", self.k_aux, " (or None for d_model // 2)")
        if not self.aux_coeff >= 0:
            raise HsaeError(f"sae.aux_coeff={self.aux_coeff!r} must be >= 0 (0 turns AuxK off)")
        if self.dead_tokens_threshold is not None:
            check_positive_int(
                "dead_tokens_threshold", self.dead_tokens_threshold, " (or None: nothing dead)"
            )
        self.register_buffer("rows_since_fired", torch.zeros(n_tracked, dtype=torch.long))  # type: ignore[attr-defined]

    def dead_latents(self) -> torch.Tensor:
        """``[n_tracked]`` bool: latents that fired on none of the last threshold rows."""
        if self.dead_tokens_threshold is None:
            return torch.zeros_like(self.rows_since_fired, dtype=torch.bool)
        return self.rows_since_fired >= self.dead_tokens_threshold

    @torch.no_grad()
    def _update_fired(self, codes_nk: torch.Tensor) -> None:
        self._mark_fired((codes_nk != 0).any(dim=0), codes_nk.shape[0])

    @torch.no_grad()
    def _mark_fired(self, fired_k: torch.Tensor, n_rows: int) -> None:
        if _GLOBAL_BATCH.get():  # fired on any rank; rows of the global batch
            stats = torch.cat([fired_k.long(), fired_k.new_tensor([n_rows], dtype=torch.long)])
            dist.all_reduce(stats)
            fired_k, n_rows = stats[:-1] > 0, int(stats[-1])
        self.rows_since_fired.add_(n_rows).masked_fill_(fired_k, 0)

    @torch.no_grad()
    def _auxk_indices(self, pre_nk: torch.Tensor, dead_k: torch.Tensor) -> torch.Tensor | None:
        """``[n, k_aux]``: each row's largest pre-activations among the dead latents, or None
        when AuxK is off this step (nothing dead, not training, or ``aux_coeff=0``)."""
        n_dead = int(dead_k.sum())
        if not self.training or n_dead == 0 or self.aux_coeff == 0:
            return None
        k_aux = min(self.k_aux or max(1, self.d_model // 2), n_dead)
        return pre_nk.masked_fill(~dead_k, float("-inf")).topk(k_aux, dim=-1, sorted=False).indices

    def _auxk_loss(
        self,
        pre_nk: torch.Tensor,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        dead_k: torch.Tensor,
        W_dec: torch.Tensor,
    ) -> torch.Tensor | None:
        """Weighted AuxK term, or None when nothing is dead (the loss is then unchanged)."""
        indices = self._auxk_indices(pre_nk, dead_k)
        if indices is None:
            return None
        aux_codes = torch.zeros_like(pre_nk).scatter_(
            -1, indices, pre_nk.gather(-1, indices).relu()
        )
        # The residual is a target, not a path: AuxK trains only the dead latents.
        residual = (x - x_hat).detach()
        return self.aux_coeff * normalized_mse(aux_codes @ W_dec, residual)
