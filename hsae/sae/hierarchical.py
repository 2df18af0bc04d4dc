"""Hierarchical sparse autoencoder (H-SAE).

Muchane, Richardson, Park & Veitch 2025, "Incorporating Hierarchical Semantics in Sparse
Autoencoder Architectures" (arXiv:2506.01197). A top-level TopK SAE of parent latents, and
for each parent a small child SAE (a mixture of experts, one expert per parent) whose
latents may fire only on rows where their parent fires:

    parents  p = TopK_k(W_enc (x - b_pre) + b_enc)
    children c_j = TopK_{k_child}(W_cenc,j (x - b_pre) + b_cenc,j) * 1[p_j > 0]
    x_hat = b_pre + sum_j p_j W_dec,j + sum_j sum_i c_j,i W_cdec,j,i

so a child direction only has to explain what is left once its parent is present (the
parent's own direction is never absorbed into its children), and the parent is forced to
carry what the children share. The paper routes each child SAE through a learned
low-dimensional subspace of its parent (down- and up-projections); a product of linear
maps is one linear map, so here the projections are folded into the child encoder and
decoder, the same function class whenever ``n_children`` is at most the subspace width,
without its extra matmuls. ``k_child=1`` is the paper's top-1 inside each expert.

Codes are ``[n, n_latents]``: the ``n_parents`` parents first, then each parent's
``n_children`` children in parent order, ``n_latents = n_parents * (1 + n_children)``.
Parent and child decoder rows at unit norm, encoders initialised as their transposes,
AuxK on dead parents. ``k`` counts parents: a row has at most ``k * (1 + k_child)``
active latents.

``parent_recon_coeff`` (an hsae addition, not in the paper; 0 turns it off) adds the
parents' reconstruction on their own, without children, to the loss, as Matryoshka does
for its first group. It breaks a symmetry the paper's loss leaves open: a spare parent
latent can otherwise learn a merged ``parent + child`` direction and leave its child SAE
idle; on hsae's synthetic hierarchy (docs/sae_zoo.md) 0.3 improves parents and children.
"""

from __future__ import annotations

import torch
from torch import nn

from hsae.config import SAEConfig
from hsae.errors import HsaeError
from hsae.sae.auxk import AuxKMixin
from hsae.sae.base import (
    ForwardOutput,
    SparseAutoencoder,
    UnitNormDecoderMixin,
    check_k,
    check_positive_int,
    normalized_mse,
    topk_codes,
    unit_rows_,
)


class HierarchicalSAE(UnitNormDecoderMixin, AuxKMixin, SparseAutoencoder):
    arch = "hierarchical"
    unit_norm_decoders = ("W_dec", "W_cdec")
    encoder_weights = ("W_enc", "W_cenc")
    decoder_weights = ("W_dec", "W_cdec")
    W_enc: nn.Parameter
    b_enc: nn.Parameter

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        k: int,
        # Defaults (and why): hsae.config.SAEConfig, the one place they are written.
        n_children: int = SAEConfig.n_children,
        k_child: int = SAEConfig.k_child,
        k_aux: int | None = SAEConfig.k_aux,
        aux_coeff: float = SAEConfig.aux_coeff,
        dead_tokens_threshold: int | None = None,
        parent_recon_coeff: float = SAEConfig.parent_recon_coeff,
    ):
        super().__init__()
        check_positive_int("n_latents", n_latents)
        check_positive_int("n_children", n_children)
        if n_latents % (1 + n_children):
            raise HsaeError(
                f"sae.n_latents={n_latents} must be a multiple of 1 + sae.n_children "
                f"({1 + n_children}): each parent brings its {n_children} children; change "
                "sae.expansion or sae.n_children"
            )
        if not parent_recon_coeff >= 0:
            raise HsaeError(
                f"sae.parent_recon_coeff={parent_recon_coeff!r} must be >= 0 (0 = the paper's loss)"
            )
        n_parents = n_latents // (1 + n_children)
        check_k(k, n_parents, what="the number of parents, n_latents / (1 + n_children)")
        if not isinstance(k_child, int) or not 0 < k_child <= n_children:
            raise HsaeError(f"sae.k_child={k_child!r} must be in 1..sae.n_children ({n_children})")
        self.d_model, self.n_latents, self.k = d_model, n_latents, k
        self.n_children, self.k_child, self.n_parents = n_children, k_child, n_parents
        self.k_aux, self.aux_coeff = k_aux, aux_coeff
        self.dead_tokens_threshold = dead_tokens_threshold
        self.parent_recon_coeff = parent_recon_coeff
        self._declare_parameters(d_model, n_parents)  # the parents' dictionary
        # [d, parent, child] so the encoder is one matmul over every child at once.
        self.W_cenc = nn.Parameter(torch.empty(d_model, n_parents, n_children))
        self.b_cenc = nn.Parameter(torch.zeros(n_parents, n_children))
        self.W_cdec = nn.Parameter(torch.empty(n_parents, n_children, d_model))
        self._init_auxk(n_parents)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()  # the parents; then the children the same way
        nn.init.kaiming_uniform_(self.W_cdec.view(-1, self.d_model))
        unit_rows_(self.W_cdec)
        self.W_cenc.copy_(self.W_cdec.permute(2, 0, 1))
        self.b_cenc.zero_()

    def decoder_rows(self) -> torch.Tensor:
        return torch.cat([self.W_dec, self.W_cdec.reshape(-1, self.d_model)])

    def _encode_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(parent pre-activations [n, n_parents], codes [n, n_latents])``."""
        centred = x - self.b_pre
        pre_np = centred @ self.W_enc + self.b_enc
        parents = topk_codes(pre_np, self.k)
        child_pre = centred @ self.W_cenc.view(self.d_model, -1)
        child_pre_npc = child_pre.view(-1, self.n_parents, self.n_children) + self.b_cenc
        on_np1 = (parents > 0).unsqueeze(-1).to(x.dtype)
        children = topk_codes(child_pre_npc, self.k_child) * on_np1
        return pre_np, torch.cat([parents, children.flatten(1)], dim=-1)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode_parts(x)[1]

    def _forward(self, x: torch.Tensor) -> ForwardOutput:
        dead_p = self.dead_latents()
        pre_np, codes = self._encode_parts(x)
        x_hat = self._decode(codes)
        recon = normalized_mse(x_hat, x)
        aux = self._auxk_loss(pre_np, x, x_hat, dead_p, self.W_dec)
        if self.training:
            self._update_fired(codes[:, : self.n_parents])
        if self.parent_recon_coeff > 0:
            parents_only = codes[:, : self.n_parents] @ self.W_dec + self.b_pre
            parent_term = self.parent_recon_coeff * normalized_mse(parents_only, x)
            aux = parent_term if aux is None else aux + parent_term
        loss = recon if aux is None else recon + aux
        return ForwardOutput(x_hat=x_hat, codes=codes, loss=loss, recon_loss=recon, aux_loss=aux)
