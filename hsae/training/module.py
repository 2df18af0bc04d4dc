"""The ``LightningModule`` that trains SAEs: optimisation, logging, validation metrics.

It holds a bank of SAEs trained on the same batches (a single run is a bank of one). Each
member has its own parameters, optimiser state, learning rate, random stream and metrics,
so it ends exactly where the same config trained alone with the same seed ends; what the
members share is the data pass and the per-step overhead (docs/training.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from hsae.errors import HsaeError
from hsae.sae import SparseAutoencoder, make_sae
from hsae.sae.base import global_batch
from hsae.sae.metrics import make_sae_metrics
from hsae.training.data import CacheDataModule

# Training rows the inference statistics are calibrated on at each epoch's end (all of an
# epoch when it is smaller): enough for a threshold quantile to ~0.1% at k >= 8.
CALIBRATION_ROWS = 65_536


def default_lr(n_latents: int) -> float:
    """Scale the learning rate with 1/sqrt(width), anchored at 2e-4 for 16,384 latents (sparsify)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


def _single_sae_key(key: str) -> str:
    for old, new in (("sae.", "saes.0."), ("val_metrics.", "val_metrics.0.")):
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key


class SAEModule(L.LightningModule):
    """Trains ``bank`` (entries ``{"name", "sae", "lr"}``, logged as ``<name>/train/loss``,
    ...); a single SAE is a bank of one whose name is None (or ``sae`` and ``lr``), logged
    without a prefix (``train/loss``, ``val/fvu``, ...).

    With ``seed`` set, every member is built right after ``torch.manual_seed(seed)`` (in a
    forked RNG, so the caller's stream is untouched), and draws its training-time random
    numbers (Matryoshka's random prefixes) from a CPU generator of its own: a member's
    weights then depend on its own config only, not on its place in the bank or on its
    neighbours, and equal those of a single run of that config with the same seed.
    """

    def __init__(
        self,
        sae: dict[str, Any] | None = None,
        lr: float | None = None,
        warmup_steps: int = 50,
        decay_fraction: float = 0.2,
        bank: list[dict[str, Any]] | None = None,
        seed: int | None = None,
        compile: bool = False,
    ):
        super().__init__()
        if (sae is None) == (bank is None):
            raise ValueError("pass exactly one of sae (one SAE) or bank (a list of members)")
        members = [{"name": None, "sae": sae, "lr": lr}] if bank is None else bank
        self.names: list[str | None] = [m["name"] for m in members]
        if self.names != [None] and (None in self.names or len(set(self.names)) < len(self.names)):
            raise ValueError(
                f"bank members need distinct names (only a bank of one may leave its name "
                f"None, a single SAE); got {self.names}"
            )
        if self.names == [None]:  # a single SAE, recorded in the checkpoint as `sae`/`lr`
            sae, lr, bank = members[0]["sae"], members[0]["lr"], None
        hparams = dict(sae=sae, lr=lr, warmup_steps=warmup_steps, decay_fraction=decay_fraction)
        hparams |= dict(bank=bank, seed=seed, compile=compile)
        self.save_hyperparameters(hparams, logger=False)  # the flat run config is logged instead
        saes, self._rng_states = [], []
        for member in members:
            # Without a seed, members are built one after another from the caller's stream.
            forked = (
                torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
            )
            with forked:
                if seed is not None:
                    torch.manual_seed(seed)
                saes.append(make_sae(**member["sae"]))
                self._rng_states.append(torch.get_rng_state())
        if compile:  # in place: parameter names and checkpoints stay those of the eager SAE
            for sae in saes:
                sae.compile()
        self.saes = nn.ModuleList(saes)
        self.lrs = [
            m["lr"] if m["lr"] is not None else default_lr(m["sae"]["n_latents"]) for m in members
        ]
        self.val_metrics = nn.ModuleList(
            make_sae_metrics(s.d_model, s.n_latents, prefix=f"{self.metric_prefix(i)}val/")
            for i, s in enumerate(saes)
        )

    @property
    def sae(self) -> SparseAutoencoder:
        """The SAE of a single run (a bank of one)."""
        if len(self.saes) != 1:
            raise TypeError(f"this module trains a bank of {len(self.saes)} SAEs; use .saes[i]")
        return self.saes[0]  # type: ignore[return-value]

    @property
    def lr(self) -> float:
        """The learning rate of a single run."""
        (lr,) = self.lrs
        return lr

    def metric_prefix(self, i: int) -> str:
        """``""`` for a single run, ``"<member name>/"`` for a bank member."""
        return "" if self.names[i] is None else f"{self.names[i]}/"

    @contextlib.contextmanager
    def _member_rng(self, i: int) -> Iterator[None]:
        # The SAEs draw from the global CPU generator (torch.rand without a device); swap in
        # this member's state so members never consume each other's random numbers.
        outer = torch.get_rng_state()
        torch.set_rng_state(self._rng_states[i])
        try:
            yield
        finally:
            self._rng_states[i] = torch.get_rng_state()
            torch.set_rng_state(outer)

    def forward(self, x: torch.Tensor) -> list:
        """Each member's ``ForwardOutput`` for ``x``, in bank order."""
        return [sae(x) for sae in self.saes]

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        outputs = []
        for i, sae in enumerate(self.saes):
            # The SAE's hooks (SparseAutoencoder: no-ops unless the architecture needs them).
            sae.set_progress(self.global_step, int(self.trainer.estimated_stepping_batches))
            # Under DDP, batch statistics of the global batch: N ranks train like one process.
            with self._member_rng(i), global_batch():
                outputs.append(sae(batch))
        # The members' parameters are disjoint, so the gradient of the sum is, bit for bit,
        # each member's own gradient (d total / d loss_i = 1).
        total = outputs[0].loss
        for out in outputs[1:]:
            total = total + out.loss
        if not torch.isfinite(total):  # one host sync per step, whatever the bank size
            raise HsaeError(self._not_finite_message([out.loss for out in outputs]))
        lrs = self.lr_schedulers().get_last_lr()  # type: ignore[union-attr]
        for i, out in enumerate(outputs):
            prefix = self.metric_prefix(i)
            self.log(f"{prefix}train/loss", out.loss, prog_bar=len(self.saes) == 1)
            # count_nonzero: no [rows x latents] mask (20x faster than (codes != 0).sum()).
            self.log(f"{prefix}train/l0", torch.count_nonzero(out.codes) / out.codes.shape[0])
            self.log(f"{prefix}lr", lrs[i])
        return total

    def _not_finite_message(self, losses: list[torch.Tensor]) -> str:
        bad = [i for i, loss in enumerate(losses) if not torch.isfinite(loss)]
        step = self.global_step
        rest = "or the cache holds NaN/Inf rows; nothing was saved over the last good checkpoint"
        if self.names[0] is None:
            return (
                f"training loss is {losses[0].item()} at step {step}: the learning rate "
                f"may be too high (optim.lr={self.lrs[0]:.3g}) {rest}"
            )
        if not bad:  # every member finite, their sum not: the losses themselves are huge
            values = ", ".join(
                f"{n}={loss.item():.3g}" for n, loss in zip(self.names, losses, strict=True)
            )
            return f"the bank's summed training loss overflowed at step {step} ({values}) {rest}"
        i = bad[0]
        others = f" (also: {', '.join(str(self.names[j]) for j in bad[1:])})" if bad[1:] else ""
        return (
            f"training loss of bank member {self.names[i]} is {losses[i].item()} at step "
            f"{step}{others}: its learning rate may be too high (lr={self.lrs[i]:.3g}; set "
            f"the entry's lr, or optim.lr for all) {rest}"
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for sae in self.saes:
            sae.before_optimizer_step()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        for sae in self.saes:
            sae.after_optimizer_step()

    def on_validation_epoch_start(self) -> None:
        # The end of a training epoch: validation runs before the epoch's checkpoint, so the
        # inference statistics set here (BatchTopK's threshold, calibrated to L0 = k on
        # training rows) are the ones validation scores and the checkpoint saves. Not in
        # `trainer.validate` after fit: nothing after fit changes the SAEs.
        trainer = self.trainer
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        saes = [sae for sae in self.saes if sae.needs_calibration()]
        datamodule = getattr(trainer, "datamodule", None)
        if not saes or not isinstance(datamodule, CacheDataModule):  # plain loaders: no sample
            return
        # The same seeded rows on every rank and at every epoch: DDP ranks agree exactly.
        rows = datamodule.sample(CALIBRATION_ROWS, seed=self.hparams.seed or 0).to(self.device)
        for sae in saes:
            sae.calibrate(rows)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        for sae, metrics in zip(self.saes, self.val_metrics, strict=True):
            out = sae(batch)
            metrics.update(batch, out.x_hat, out.codes)
            self.log_dict(metrics, on_step=False, on_epoch=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resuming continues each member's random stream where it stopped.
        checkpoint["sae_rng_states"] = [state.clone() for state in self._rng_states]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        if len(self.saes) == 1 and any(key.startswith("sae.") for key in state):
            # A checkpoint from before banks (one SAE at `sae.`, its metrics at `val_metrics.`).
            checkpoint["state_dict"] = {_single_sae_key(key): value for key, value in state.items()}
        if "sae_rng_states" in checkpoint:
            self._rng_states = [s.clone() for s in checkpoint["sae_rng_states"]]

    def configure_optimizers(self):
        # One Adam, one parameter group per member: Adam's update is per parameter (its
        # moments, step count and bias correction are per tensor) and a group only carries
        # a learning rate, so this is exactly one Adam per member, with per-member lrs.
        optimizer = torch.optim.Adam(
            [
                {"params": list(sae.parameters()), "lr": lr}
                for sae, lr in zip(self.saes, self.lrs, strict=True)
            ],
            fused=self.device.type == "cuda",  # one kernel for all parameters
        )
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
