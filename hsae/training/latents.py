"""Per-latent statistics over a cached split: how often each latent fires, how strongly,
and on which images (with the token behind the maximum, for patch-token SAEs)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hsae.cache import ActivationCache


@dataclass
class LatentStats:
    frequency_k: torch.Tensor
    """Fraction of rows on which each latent fires."""
    mean_act_k: torch.Tensor
    """Mean activation of each latent over the rows where it fires (0 if it never does)."""
    top_values_kt: torch.Tensor
    """``[n_latents, top_n]`` largest per-image activations, descending (0 = no image)."""
    top_images_kt: torch.Tensor
    """Dataset image index behind each of those values (-1 = none)."""
    top_tokens_kt: torch.Tensor
    """Token (within the image) where that maximum occurred."""


@torch.no_grad()
def collect_latent_stats(
    sae: nn.Module,
    cache: ActivationCache,
    top_n: int = 9,
    batch_size: int = 4096,
    device: torch.device | str = "cpu",
) -> LatentStats:
    """One pass over the cache, in row order. Memory: O(n_latents x top_n)."""
    n_latents = sae.n_latents
    tokens_per_image = cache.manifest["tokens_per_image"]
    # Whole images per batch, so an image's maximum is complete within one batch.
    rows_per_batch = max(1, batch_size // tokens_per_image) * tokens_per_image
    fire_count = torch.zeros(n_latents, dtype=torch.long, device=device)
    act_sum = torch.zeros(n_latents, dtype=torch.float64, device=device)
    top_values = torch.zeros(n_latents, top_n, device=device)
    top_images = torch.full((n_latents, top_n), -1, dtype=torch.long, device=device)
    top_tokens = torch.full((n_latents, top_n), -1, dtype=torch.long, device=device)
    for start in range(0, cache.n_rows, rows_per_batch):
        rows = np.arange(start, min(start + rows_per_batch, cache.n_rows))
        codes_rk = sae.encode(cache.read(rows).to(device)).float()
        fire_count += (codes_rk != 0).sum(dim=0)
        act_sum += codes_rk.sum(dim=0).double()
        n_img = len(rows) // tokens_per_image
        per_image = codes_rk.view(n_img, tokens_per_image, n_latents)
        img_max_ik, argmax_ik = per_image.max(dim=1)
        image_ids = torch.as_tensor(cache.row_image(rows[::tokens_per_image]), device=device)
        token_ids = torch.as_tensor(cache.manifest["token_index"], device=device)[argmax_ik]
        # Merge this batch's images into the running top-n per latent.
        values = torch.cat([top_values, img_max_ik.T], dim=1)
        images = torch.cat([top_images, image_ids.expand(n_latents, -1)], dim=1)
        tokens = torch.cat([top_tokens, token_ids.T], dim=1)
        best = values.topk(top_n, dim=1)
        top_values = best.values
        top_images = images.gather(1, best.indices)
        top_tokens = tokens.gather(1, best.indices)
    top_images[top_values <= 0] = -1
    top_tokens[top_values <= 0] = -1
    frequency = fire_count.double() / max(1, cache.n_rows)
    mean_act = act_sum / fire_count.clamp_min(1)
    return LatentStats(
        frequency_k=frequency.float().cpu(),
        mean_act_k=mean_act.float().cpu(),
        top_values_kt=top_values.cpu(),
        top_images_kt=top_images.cpu(),
        top_tokens_kt=top_tokens.cpu(),
    )


def highlight_patch(image_chw: torch.Tensor, token: int, token_index: list[int]) -> torch.Tensor:
    """Dim everything but the patch behind ``token`` when the cached rows are a square grid
    of patch tokens (``tokens=patch``); other token selections are returned unchanged."""
    side = round(len(token_index) ** 0.5)
    patch = token - token_index[0]
    if (
        len(token_index) == 1
        or side * side != len(token_index)
        or not 0 <= patch < len(token_index)
    ):
        return image_chw
    _, h, w = image_chw.shape
    row, col = divmod(patch, side)
    mask = torch.full((1, h, w), 0.35)
    mask[:, row * h // side : (row + 1) * h // side, col * w // side : (col + 1) * w // side] = 1.0
    return image_chw * mask
