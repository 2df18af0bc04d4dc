"""Training objectives of the stand-in backbones (``backbone.pretrained``): the only thing
that differs between a flat and a hierarchical stand-in.

- ``flat``: cross-entropy on the finest labels (the leaves) only; the "common model". It
  sees nothing of the tree, so it is free to organise its features by it or not.
- ``hier``: cross-entropy at every level (mean over levels) plus the CPCC regulariser of
  Zeng et al., ICLR 2024 ("Learning Structured Representations by Embedding Class
  Hierarchy"): ``- cpcc_weight * CPCC``, the Pearson correlation, over pairs of leaf
  classes present in the batch, between their tree distance and the Euclidean distance of
  their class-mean embeddings. The per-level cross-entropies make every level linearly
  readable (Bertinetto et al. 2020 use the same idea as "soft labels"); CPCC is what makes
  the *geometry* follow the tree, which is what step 1 measures (``hier/cpcc`` and the
  probes), and per-level cross-entropy alone barely moves it (issue #13: about -0.11 vs
  -0.13 on version-1 data).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hsae.cpcc import cpcc_pairs
from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy

OBJECTIVES = ("flat", "hier")


def batch_cpcc(emb_be: torch.Tensor, leaves_b: torch.Tensor, tree_cc: torch.Tensor) -> torch.Tensor:
    """Differentiable CPCC of one batch: leaf-class means of ``emb_be``, their pairwise
    Euclidean distances against ``tree_cc`` (leaf tree distances). 0 when fewer than three
    classes are present (the correlation is undefined)."""
    tree, dist = cpcc_pairs(emb_be, leaves_b, tree_cc, smooth_eps=1e-8)
    if len(dist) < 3:  # 3 pairs: 3 classes
        return emb_be.new_zeros(())
    dist_c, tree_c = dist - dist.mean(), tree - tree.mean()
    denom = dist_c.norm() * tree_c.norm()
    return (dist_c * tree_c).sum() / denom.clamp_min(1e-8)


def make_objective(
    name: str, hierarchy: Hierarchy, cpcc_weight: float, coarse_ce_weight: float = 1.0
) -> Callable[[torch.Tensor, list[torch.Tensor], torch.Tensor], tuple[torch.Tensor, dict]]:
    """``loss(embedding [B, e], logits per level, labels [B, levels]) -> (loss, terms)``."""
    if name not in OBJECTIVES:
        raise HsaeError(
            f"backbone.pretrained={name!r} is not a stand-in objective; valid: "
            f"{', '.join(OBJECTIVES)}"
        )
    tree_cc = torch.as_tensor(hierarchy.leaf_distance(), dtype=torch.float32)

    def flat(emb, logits, labels_bl):
        ce = F.cross_entropy(logits[-1], labels_bl[:, -1])
        return ce, {"ce_leaf": float(ce.detach())}

    def hier(emb, logits, labels_bl):
        ces = [F.cross_entropy(lg, labels_bl[:, lv]) for lv, lg in enumerate(logits)]
        # The leaf term has the flat objective's weight; coarse levels come on top.
        ce = ces[-1] + coarse_ce_weight * sum(ces[:-1])
        cpcc = batch_cpcc(emb, labels_bl[:, -1], tree_cc.to(emb.device))
        return ce - cpcc_weight * cpcc, {
            "ce_leaf": float(ces[-1].detach()),
            "cpcc": float(cpcc.detach()),
        }

    return flat if name == "flat" else hier
