"""The ``LightningModule`` that trains one SAE: optimisation, logging, validation metrics."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from hsae.errors import HsaeError
from hsae.metrics import make_sae_metrics
from hsae.sae import make_sae


def default_lr(n_latents: int) -> float:
    """Scale the learning rate with 1/sqrt(width), anchored at 2e-4 for 16,384 latents (sparsify)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


class SAEModule(L.LightningModule):
    def __init__(
        self,
        sae: dict[str, Any],
        lr: float | None = None,
        warmup_steps: int = 50,
        decay_fraction: float = 0.2,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)  # the flat run config is logged instead
        self.sae = make_sae(**sae)
        self.lr = lr if lr is not None else default_lr(sae["n_latents"])
        self.val_metrics = make_sae_metrics(sae["d_model"], sae["n_latents"], prefix="val/")

    def forward(self, x: torch.Tensor):
        return self.sae(x)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if hasattr(self.sae, "set_progress"):  # sparsity-coefficient warm-up
            self.sae.set_progress(self.global_step, int(self.trainer.estimated_stepping_batches))
        out = self.sae(batch)
        if not torch.isfinite(out.loss):
            raise HsaeError(
                f"training loss is {out.loss.item()} at step {self.global_step}: the learning rate "
                f"may be too high (optim.lr={self.lr:.3g}) or the cache holds NaN/Inf rows; nothing "
                "was saved over the last good checkpoint"
            )
        self.log("train/loss", out.loss, prog_bar=True)
        self.log("train/l0", (out.codes != 0).sum(dim=-1).float().mean())
        self.log("lr", self.lr_schedulers().get_last_lr()[0])  # type: ignore[union-attr]
        return out.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if hasattr(self.sae, "remove_parallel_grad"):
            self.sae.remove_parallel_grad()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if hasattr(self.sae, "normalize_decoder"):
            self.sae.normalize_decoder()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        out = self.sae(batch)
        self.val_metrics.update(batch, out.x_hat, out.codes)
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, self.hparams.warmup_steps)
        decay_start = int(total * (1 - self.hparams.decay_fraction))

        def factor(step: int) -> float:
            ramp = min(1.0, (step + 1) / warmup)
            if step < decay_start:
                return ramp
            return ramp * max(0.0, (total - step) / max(1, total - decay_start))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
