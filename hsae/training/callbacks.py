"""Extras logged at the end of training, outside the training maths: the feature-density
histogram, a grid of top-activating images for a sample of latents, and a per-latent
table (W&B only; the local run dir has the numbers in metrics.json)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torchvision.utils import make_grid

from hsae.cache import ActivationCache
from hsae.tracking import wandb_guard
from hsae.training.latents import collect_latent_stats, highlight_patch

log = logging.getLogger(__name__)


def to_uint8_hwc(image_chw: torch.Tensor) -> np.ndarray:
    """``[3, h, w]`` in [0, 1] -> ``[h, w, 3]`` uint8 in 0..255. W&B casts float arrays to
    uint8 without scaling, so [0, 1] images passed as they are come out black (0 or 1)."""
    pixels = image_chw.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).cpu().numpy()


class LatentReport(L.Callback):
    """Logs the report into the job's W&B run when fitting ends: a single SAE's own run. A
    bank's job logs to CSV (each member gets its own W&B run after training), so there the
    callback does nothing and ``hsae.training.run`` calls ``log_to`` once per member."""

    def __init__(
        self,
        load_image: Callable[[int], torch.Tensor],
        class_names: list[str],
        n_latents_shown: int = 8,
        top_n: int = 9,
        seed: int = 0,
    ):
        self.load_image, self.class_names = load_image, class_names
        self.n_latents_shown, self.top_n, self.seed = n_latents_shown, top_n, seed

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (trainer.is_global_zero and isinstance(trainer.logger, WandbLogger)):
            return
        cache = trainer.datamodule.val_rows.cache  # type: ignore[attr-defined]
        self.log_to(trainer.logger, pl_module.sae, cache, pl_module.device)

    def log_to(
        self, logger: WandbLogger, sae: nn.Module, cache: ActivationCache, device: torch.device
    ) -> None:
        """The report of ``sae`` over ``cache`` into ``logger``'s W&B run (failures warn).

        In eval mode, without gradients: the codes are those ``metrics.json`` and
        ``evaluate.py`` use (BatchTopK's threshold, not a batch selection), and no val row
        moves a trained buffer (the threshold, AuxK's counts). The mode is restored after."""
        was_training = sae.training
        sae.eval()
        try:
            with wandb_guard("log the latent report"), torch.no_grad():
                self._report(logger.experiment, sae, cache, device)
        finally:
            sae.train(was_training)

    def _report(self, run, sae: nn.Module, cache: ActivationCache, device: torch.device) -> None:
        import wandb

        stats = collect_latent_stats(sae, cache, top_n=self.top_n, device=device)
        log10_density = torch.log10(stats.frequency_k.clamp_min(1e-7)).numpy()
        run.log({"latents/log10_density": wandb.Histogram(log10_density)})

        alive = np.flatnonzero(stats.frequency_k.numpy() > 0)
        rng = np.random.default_rng(self.seed)
        shown = np.sort(
            rng.choice(alive, size=min(self.n_latents_shown, len(alive)), replace=False)
        )
        token_index = cache.manifest["token_index"]
        fine_labels = cache.labels_nl[:, -1]
        images, rows = [], []
        for latent in shown:
            tiles = [
                highlight_patch(self.load_image(int(image_id)), int(token), token_index)
                for image_id, token in zip(
                    stats.top_images_kt[latent], stats.top_tokens_kt[latent], strict=True
                )
                if image_id >= 0
            ]
            # Blank tiles keep every grid the same size when a latent fired on few images.
            tiles += [torch.zeros_like(tiles[0])] * (self.top_n - len(tiles))
            grid = make_grid(torch.stack(tiles), nrow=int(np.ceil(np.sqrt(self.top_n))), padding=1)
            images.append(wandb.Image(to_uint8_hwc(grid), caption=f"latent {latent}"))
        for latent in range(len(stats.frequency_k)):
            top = stats.top_images_kt[latent]
            labels = fine_labels[top[top >= 0].numpy()] if (top >= 0).any() else np.array([], int)
            names, counts = np.unique(labels, return_counts=True)
            order = np.argsort(-counts)[:3]
            top_labels = ", ".join(f"{self.class_names[names[i]]} ({counts[i]})" for i in order)
            rows.append(
                [
                    latent,
                    float(stats.frequency_k[latent]),
                    float(stats.mean_act_k[latent]),
                    top_labels,
                ]
            )
        run.log(
            {
                "latents/top_images": images,
                "latents/table": wandb.Table(
                    columns=["latent", "density", "mean_activation", "top_labels"], data=rows
                ),
            }
        )
