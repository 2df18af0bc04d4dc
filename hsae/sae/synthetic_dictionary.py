"""Ground truth for SAE recovery: activations built from a known sparse dictionary.

More unit-norm feature directions than dimensions (superposition), each firing with a
Zipf-like frequency and a random magnitude. Three kinds of feature:

- *independent*: fires on its own, with its own frequency;
- *parent*: fires like an independent feature, and on a fraction ``child_probability`` of
  the rows where it fires, exactly one of its children fires with it;
- *child*: fires only with its parent (a hierarchy such as animal -> dog | cat | bird).

Directions are random, so a child is nearly orthogonal to its parent: an SAE that merges
the two into one latent (feature absorption) writes ``(parent + child) / sqrt(2)`` and
scores about 0.71 on both. The score of an SAE is, for each true feature, the largest
cosine between it and any decoder row, averaged over each kind of feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsae.errors import HsaeError
from hsae.sae.base import SparseAutoencoder

KINDS = ("independent", "parent", "child")
INDEPENDENT, PARENT, CHILD = range(3)


@dataclass(frozen=True)
class SyntheticDictionary:
    directions_fd: torch.Tensor
    """``[n_features, d]`` unit-norm true feature directions."""
    kind_f: torch.Tensor
    """``[n_features]`` 0 independent, 1 parent, 2 child (indexes ``KINDS``)."""
    parent_f: torch.Tensor
    """``[n_features]`` index of each child's parent feature; -1 for the others."""
    probability_f: torch.Tensor
    """``[n_features]`` firing probability; for a child, given that its parent fires."""
    child_probability: float
    """Probability that a firing parent brings one of its children."""
    min_magnitude: float = 0.5
    max_magnitude: float = 1.5

    @property
    def d_model(self) -> int:
        return self.directions_fd.shape[1]

    @property
    def n_features(self) -> int:
        return self.directions_fd.shape[0]

    def expected_l0(self) -> float:
        """Mean number of true features active per row."""
        child = self.kind_f == CHILD
        parent_probability = self.probability_f[self.parent_f[child]]
        return float(
            self.probability_f[~child].sum()
            + (parent_probability * self.probability_f[child]).sum()
        )

    def sample(self, n_rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [n_rows, d], codes [n_rows, n_features])``: rows and their true codes."""
        on_nf = torch.rand(n_rows, self.n_features, generator=generator) < self.probability_f
        on_nf &= self.kind_f != CHILD
        parents = (self.kind_f == PARENT).nonzero().flatten()
        for parent in parents.tolist():
            children = (self.parent_f == parent).nonzero().flatten()
            with_child = on_nf[:, parent] & (
                torch.rand(n_rows, generator=generator) < self.child_probability
            )
            rows = with_child.nonzero().flatten()
            if len(rows) == 0:
                continue
            # Exactly one child per occurrence, drawn in proportion to their probabilities.
            picks = torch.multinomial(
                self.probability_f[children], len(rows), replacement=True, generator=generator
            )
            on_nf[rows, children[picks]] = True
        span = self.max_magnitude - self.min_magnitude
        magnitude_nf = self.min_magnitude + span * torch.rand(
            n_rows, self.n_features, generator=generator
        )
        codes_nf = magnitude_nf * on_nf
        return codes_nf @ self.directions_fd, codes_nf


def make_synthetic_dictionary(
    d_model: int = 32,
    n_independent: int = 64,
    n_parents: int = 8,
    n_children: int = 4,
    target_l0: float = 4.0,
    zipf_exponent: float = 0.5,
    child_probability: float = 0.8,
    max_probability: float = 0.5,
    seed: int = 0,
) -> SyntheticDictionary:
    """A random dictionary whose rows have ``target_l0`` active features on average.

    Independent and parent features share one Zipf law (``p ∝ rank^-zipf_exponent``, ranks
    shuffled across them), scaled to ``target_l0`` and capped at ``max_probability``;
    children of a parent are chosen by their own Zipf law.
    """
    if n_independent < 0 or n_parents < 0 or n_independent + n_parents == 0:
        raise HsaeError(
            f"n_independent={n_independent}, n_parents={n_parents}: need at least one feature"
        )
    if n_parents and n_children < 1:
        raise HsaeError(f"n_children={n_children} must be >= 1 when there are parents")
    if not 0 <= child_probability <= 1:
        raise HsaeError(f"child_probability={child_probability} must be in [0, 1]")
    generator = torch.Generator().manual_seed(seed)
    n_top = n_independent + n_parents
    n_features = n_top + n_parents * n_children
    directions = torch.randn(n_features, d_model, generator=generator)
    directions /= directions.norm(dim=-1, keepdim=True)

    kind = torch.full((n_features,), CHILD, dtype=torch.long)
    kind[:n_independent] = INDEPENDENT
    kind[n_independent:n_top] = PARENT
    parent = torch.full((n_features,), -1, dtype=torch.long)
    parent[n_top:] = torch.arange(n_independent, n_top).repeat_interleave(n_children)

    ranks = torch.randperm(n_top, generator=generator).double() + 1
    weight = ranks.pow(-zipf_exponent)
    # Each parent occurrence adds a child on child_probability of rows: count it in the L0.
    per_feature_l0 = torch.where(kind[:n_top] == PARENT, 1 + child_probability, 1.0)
    scale = target_l0 / float((weight * per_feature_l0).sum())
    if scale * weight.max() > max_probability:
        raise HsaeError(
            f"target_l0={target_l0} needs a feature to fire with probability "
            f"{scale * weight.max():.2f} > max_probability={max_probability}; lower target_l0, "
            "the zipf_exponent, or add features"
        )
    probability = torch.empty(n_features, dtype=torch.float64)
    probability[:n_top] = scale * weight
    child_rank = torch.arange(1, n_children + 1, dtype=torch.float64).pow(-zipf_exponent)
    probability[n_top:] = (child_probability * child_rank / child_rank.sum()).repeat(n_parents)
    return SyntheticDictionary(
        directions_fd=directions,
        kind_f=kind,
        parent_f=parent,
        probability_f=probability.float(),
        child_probability=child_probability,
    )


@torch.no_grad()
def recovery_scores(
    decoder_rows_kd: torch.Tensor, dictionary: SyntheticDictionary
) -> dict[str, float]:
    """Mean over each kind of true feature of its largest cosine to a decoder row."""
    rows = decoder_rows_kd.detach().float()
    rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    best_f = (dictionary.directions_fd @ rows.T).max(dim=-1).values
    return {
        name: float(best_f[dictionary.kind_f == i].mean())
        for i, name in enumerate(KINDS)
        if (dictionary.kind_f == i).any()
    }


def fit_sae(
    sae: SparseAutoencoder,
    dictionary: SyntheticDictionary,
    n_steps: int = 2000,
    batch_size: int = 256,
    lr: float = 3e-3,
    decay_fraction: float = 0.2,
    seed: int = 0,
) -> SparseAutoencoder:
    """Train ``sae`` on fresh rows of ``dictionary`` each step (Adam, constant learning rate
    then linear decay over the last ``decay_fraction``), with the same hooks the Lightning
    module calls: ``set_progress``, ``before_optimizer_step``, ``after_optimizer_step``. A plain
    loop: on problems this small Lightning's per-step overhead would dominate."""
    generator = torch.Generator().manual_seed(seed)
    sae.train()
    sae.init_b_pre(dictionary.sample(4096, generator)[0])
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    decay_start = int(n_steps * (1 - decay_fraction))
    for step in range(n_steps):
        if step >= decay_start:
            for group in optimizer.param_groups:
                group["lr"] = lr * (n_steps - step) / max(1, n_steps - decay_start)
        sae.set_progress(step, n_steps)
        x, _ = dictionary.sample(batch_size, generator)
        out = sae(x)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
    return sae.eval()
