"""Moran's I: spatial autocorrelation of a latent's activations over the patch grid."""

from __future__ import annotations

import math

import torch

from hsae.errors import HsaeError


def morans_i(grid_bhw: torch.Tensor) -> torch.Tensor:
    """Moran's I of each ``[h, w]`` map with rook adjacency (4 neighbours, binary weights):

        I = (N / S0) * sum_ij w_ij z_i z_j / sum_i z_i^2,  z = x - mean(x),

    ``S0 = sum_ij w_ij``. 1 = neighbours alike (smooth blobs), ~0 = no spatial structure,
    -1 = neighbours opposite (a checkerboard). NaN for a constant map."""
    if grid_bhw.ndim != 3 or grid_bhw.shape[1] * grid_bhw.shape[2] < 2:
        raise HsaeError(
            f"Moran's I needs [b, h, w] maps with >= 2 cells, got {tuple(grid_bhw.shape)}"
        )
    x = grid_bhw.double()
    z = x - x.mean(dim=(1, 2), keepdim=True)
    h, w = x.shape[1:]
    # Each neighbouring pair counts twice in sum_ij (w_ij = w_ji = 1).
    cross = 2 * (
        (z[:, :, 1:] * z[:, :, :-1]).sum(dim=(1, 2)) + (z[:, 1:] * z[:, :-1]).sum(dim=(1, 2))
    )
    s0 = 2 * (h * (w - 1) + w * (h - 1))
    var = z.pow(2).sum(dim=(1, 2))
    constant = var <= 1e-12 * x.abs().amax(dim=(1, 2)).pow(2).clamp_min(1e-300)
    return torch.where(constant, math.nan, (h * w / s0) * cross / var.clamp_min(1e-300))


class MoranAccumulator:
    """Mean Moran's I of each latent's patch map over the images where it fires, streamed
    over batches: ``update(acts_npk)`` with patch rows in row-major grid order (``p = h*w``,
    CLS/register tokens removed), then ``compute()`` -> ``[n_latents]`` (NaN for latents
    that never fired on a map with spatial variation)."""

    def __init__(
        self, n_latents: int, grid_hw: tuple[int, int], device: str | torch.device = "cpu"
    ):
        self.grid_hw = tuple(grid_hw)
        self.sum_k = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.count_k = torch.zeros(n_latents, dtype=torch.long, device=device)

    def update(self, acts_npk: torch.Tensor) -> None:
        h, w = self.grid_hw
        if acts_npk.ndim != 3 or acts_npk.shape[1] != h * w or acts_npk.shape[2] != len(self.sum_k):
            raise HsaeError(
                f"patch activations must be [n_images, {h * w}, {len(self.sum_k)}] "
                f"(grid {h}x{w}, patch tokens only), got {tuple(acts_npk.shape)}"
            )
        acts = acts_npk.to(self.sum_k.device)
        # Only the maps of latents that fire on the image: a few hundred of 24,576 for a
        # TopK SAE, and scoring every map costs ~30x more for the same result.
        image, latent = (acts.amax(dim=1) > 0).nonzero(as_tuple=True)
        moran = morans_i(acts.permute(0, 2, 1)[image, latent].view(-1, h, w))
        use = ~torch.isnan(moran)
        self.sum_k.index_add_(0, latent[use], moran[use])
        self.count_k += torch.bincount(latent[use], minlength=len(self.count_k))

    def compute(self) -> torch.Tensor:
        return torch.where(self.count_k > 0, self.sum_k / self.count_k.clamp_min(1), math.nan)
