"""Tensor operations CAST needs, in plain torch: segment means and farthest-point sampling.

Shape letters: ``b`` images, ``n`` tokens (points), ``s`` segments, ``d`` channels,
``k`` sampled points.
"""

from __future__ import annotations

import torch


def segment_mean(x_bnd: torch.Tensor, labels_bn: torch.Tensor, n_segments: int):
    """Mean of ``x`` over each image's segments.

    ``labels_bn`` holds each point's segment id in ``[0, n_segments)``. Returns
    ``(means [b, n_segments, d], counts [b, n_segments])``; a segment without points has a
    zero mean and count 0.
    """
    b, n, d = x_bnd.shape
    flat = (labels_bn + torch.arange(b, device=labels_bn.device)[:, None] * n_segments).reshape(-1)
    sums = x_bnd.new_zeros(b * n_segments, d).index_add_(0, flat, x_bnd.reshape(-1, d))
    counts = x_bnd.new_zeros(b * n_segments).index_add_(0, flat, x_bnd.new_ones(b * n))
    means = sums / counts.clamp(min=1)[:, None]
    return means.view(b, n_segments, d), counts.view(b, n_segments)


def farthest_point_sampling(
    points_bnd: torch.Tensor,
    n_samples: int,
    start: int = 0,
    exclude_bn: torch.Tensor | None = None,
):
    """Indices ``[b, n_samples]`` chosen greedily: each next point is the one farthest
    (squared Euclidean distance) from all points chosen so far, starting at ``start``.

    Ties go to the lowest index (``argmax`` returns the first maximum). This is the
    sampler dgl's ``farthest_point_sampler`` implements, which CAST's authors call.
    ``exclude_bn`` marks points never to choose after the start (when the others run out,
    already chosen points are chosen again).
    """
    b, n, _ = points_bnd.shape
    if not 0 < n_samples <= n:
        raise ValueError(f"n_samples={n_samples} must be in 1..{n} (the number of points)")
    chosen = torch.empty(b, n_samples, dtype=torch.long, device=points_bnd.device)
    chosen[:, 0] = start
    nearest_bn = torch.full((b, n), float("inf"), dtype=points_bnd.dtype, device=points_bnd.device)
    if exclude_bn is not None:
        nearest_bn[exclude_bn] = -1.0  # below every distance, so never the maximum
    rows = torch.arange(b, device=points_bnd.device)
    # All pairwise distances once (exact differences, not the Gram-matrix shortcut, whose
    # rounding could reorder near-ties); the loop then only gathers rows. Euclidean rather
    # than squared distances: the same order, so the same choices.
    gaps_bnn = torch.cdist(points_bnd, points_bnd, compute_mode="donot_use_mm_for_euclid_dist")
    last = chosen[:, 0]
    for i in range(1, n_samples):
        nearest_bn = torch.minimum(nearest_bn, gaps_bnn[rows, last])
        last = nearest_bn.argmax(dim=1)
        chosen[:, i] = last
    return chosen
