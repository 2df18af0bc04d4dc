"""What every SAE architecture shares: its output type, the base class, the decoder-geometry
helpers and the sparsifying activations (the AuxK loss for dead latents: ``hsae.sae.auxk``)."""

from __future__ import annotations

import contextlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, ClassVar, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from hsae.errors import HsaeError


class ForwardOutput(NamedTuple):
    x_hat: torch.Tensor
    """``[n, d]`` reconstruction of the input."""
    codes: torch.Tensor
    """``[n, n_latents]`` latent activations (zero where a latent is off)."""
    loss: torch.Tensor
    """Scalar the optimiser minimises: ``recon_loss + aux_loss + sparsity_loss`` (Matryoshka
    puts the mean of its prefix losses in place of ``recon_loss``)."""
    recon_loss: torch.Tensor
    """Squared error normalised by the batch's variance (the batch's FVU)."""
    aux_loss: torch.Tensor | None = None
    """Auxiliary term as added to ``loss`` (AuxK, gated's frozen-decoder reconstruction,
    H-SAE's parents-only reconstruction); None where there is none this step."""
    sparsity_loss: torch.Tensor | None = None
    """Sparsity penalty as added to ``loss`` (L1 or L0, coefficient and warm-up applied)."""


_GLOBAL_BATCH: ContextVar[bool] = ContextVar("hsae_global_batch", default=False)


@contextlib.contextmanager
def global_batch() -> Iterator[None]:
    """Inside, a DDP rank's batch statistics are those of the global batch (all ranks'
    rows): the FVU's denominator, the rows a latent went without firing, BatchTopK's
    smallest kept activation. Each rank's loss is then its exact share of the loss one
    process computes on the whole batch, so DDP's gradient average equals that process's
    gradient. Every rank must run the same steps (they do: same config, same seed, and DDP
    broadcasts rank 0's buffers). Without an initialised process group it changes nothing."""
    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    token = _GLOBAL_BATCH.set(active)
    try:
        yield
    finally:
        _GLOBAL_BATCH.reset(token)


def batch_variance(x: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of a row to the batch mean (the denominator of the FVU); of
    the global batch inside ``global_batch`` under DDP (``x`` is then a target: no gradient
    flows through the statistic)."""
    if _GLOBAL_BATCH.get():
        with torch.no_grad():
            rows = x.detach().double()
            n_rows = rows.new_ones(1) * len(rows)
            stats = torch.cat([rows.sum(dim=0), rows.pow(2).sum().view(1), n_rows])
            dist.all_reduce(stats)
            n = stats[-1]
            variance = stats[-2] / n - (stats[:-2] / n).pow(2).sum()
            return variance.clamp_min(1e-12).to(x.dtype)
    return (x - x.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-12)


def global_min(value: torch.Tensor) -> torch.Tensor:
    """The smallest of every rank's ``value`` (a scalar) inside ``global_batch``."""
    if _GLOBAL_BATCH.get():
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value


def normalized_mse(
    x_hat: torch.Tensor, x: torch.Tensor, variance: torch.Tensor | None = None
) -> torch.Tensor:
    """Squared error over the batch's total variance: scale-free, so one learning rate and
    one loss curve read the same across backbones and layers. Pass ``batch_variance(x)``
    as ``variance`` when scoring several reconstructions of one ``x``."""
    if variance is None:
        variance = batch_variance(x)
    return (x_hat - x).pow(2).sum(dim=-1).mean() / variance


def l1_scale(x: torch.Tensor) -> torch.Tensor:
    """Divisor that puts an L1 term on the scale of Anthropic's April 2024 recipe.

    There inputs are normalised to ``E||x||^2 = d`` and the loss is ``||x - x_hat||^2 +
    lambda * L1``. Dividing that loss by ``d`` makes its first term our ``normalized_mse``
    and its second ``lambda * L1_raw / sqrt(d * variance)``: so ``l1_coeff`` keeps the
    meaning (and the typical value, ~5) it has in their recipe on any activation scale.
    """
    return (x.shape[-1] * batch_variance(x)).sqrt()


@torch.no_grad()
def geometric_median(points_nd: torch.Tensor, n_iter: int = 100, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    points = points_nd.double()
    median = points.mean(dim=0)
    for _ in range(n_iter):
        weights = 1.0 / (points - median).norm(dim=-1).clamp_min(eps)
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (new - median).norm() < eps * (1 + median.norm()):
            median = new
            break
        median = new
    return median.to(points_nd.dtype)


def topk_codes(pre_nk: torch.Tensor, k: int) -> torch.Tensor:
    """Per row: keep the ``k`` largest pre-activations, ReLU them, zero the rest."""
    top = pre_nk.topk(min(k, pre_nk.shape[-1]), dim=-1, sorted=False)
    return torch.zeros_like(pre_nk).scatter_(-1, top.indices, top.values.relu())


def batch_topk_codes(pre_nk: torch.Tensor, k: int) -> torch.Tensor:
    """Over the whole batch: keep the ``k * n`` largest ReLU'd pre-activations, so rows share
    one budget and a hard row may take more latents than an easy one."""
    acts = pre_nk.relu().flatten()
    top = acts.topk(min(k * pre_nk.shape[0], acts.numel()), sorted=False)
    return torch.zeros_like(acts).scatter_(0, top.indices, top.values).view_as(pre_nk)


def check_positive_int(name: str, value: int, fix: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HsaeError(f"sae.{name}={value!r} must be a positive integer{fix}")


def check_fraction(name: str, value: float, *, open_low: bool = False) -> None:
    low_ok = value > 0 if open_low else value >= 0
    if not (low_ok and value <= 1):
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise HsaeError(f"sae.{name}={value!r} must be in {interval}")


def check_k(k: int, n_latents: int, what: str = "sae.n_latents") -> None:
    if not isinstance(k, int) or not 0 < k <= n_latents:
        raise HsaeError(f"sae.k={k!r} must be in 1..{what} ({n_latents}); lower sae.k")


class SparseAutoencoder(nn.Module, ABC):
    """Base of every architecture: the config that rebuilds it, the direction each latent
    writes, the pre-encoder bias ``b_pre`` centred on the data, and the input scale.

    Inputs are divided by the ``input_scale`` buffer before anything else and
    reconstructions multiplied by it after (``forward``, ``encode``, ``decode``), so each
    architecture (``_forward``, ``_encode``, ``_decode``) sees inputs of unit mean squared
    norm once ``set_input_scale`` has run: its hyperparameters (JumpReLU's thresholds and
    bandwidth, decoder-row norms) mean what the papers mean on any backbone's scale. Codes
    are in those normalised units; reconstructions in the input's. ``save_sae`` folds the
    scale into the weights (``folded_state_dict``).
    """

    arch: ClassVar[str]
    # Weights whose first axis (``[d, ...]``) meets the input: divided by the scale on folding.
    encoder_weights: ClassVar[tuple[str, ...]] = ("W_enc",)
    # Weights whose last axis (``[..., d]``) writes the output: multiplied on folding.
    decoder_weights: ClassVar[tuple[str, ...]] = ("W_dec",)
    # One value per latent each (biases, JumpReLU's log thresholds): declared between the
    # encoder and ``W_dec`` by ``_declare_parameters``, zeroed by ``reset_parameters``.
    latent_vectors: ClassVar[tuple[str, ...]] = ("b_enc",)
    d_model: int
    n_latents: int
    b_pre: nn.Parameter
    W_dec: nn.Parameter
    input_scale: torch.Tensor
    folded_input_scale: float
    """Scale that ``save_sae`` folded into these weights (1: none); see ``load_sae``."""

    def __init__(self) -> None:
        super().__init__()
        # 1 = inputs as they come, until set_input_scale measures them.
        self.register_buffer("input_scale", torch.ones(()))
        self.folded_input_scale = 1.0

    # ---- what each architecture defines, in normalised units ---------------------------

    @abstractmethod
    def _forward(self, x: torch.Tensor) -> ForwardOutput:
        """``forward`` on ``x / input_scale``; ``x_hat`` in those units."""

    @abstractmethod
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of ``x / input_scale``."""

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruction in normalised units: each latent adds its decoder row."""
        return codes @ self.decoder_rows() + self.b_pre

    # ---- the parameters every architecture declares, and their initialisation ----------

    def _declare_parameters(self, d_model: int, width: int) -> None:
        """``b_pre [d]``, the encoder ``[d, width]`` (``encoder_weights[0]``), each of
        ``latent_vectors`` ``[width]``, then ``W_dec [width, d]``: in this order, which is the
        state dict's and the optimiser's (checkpoints index parameters by position).
        Call ``reset_parameters`` once every parameter is declared."""
        self.b_pre = nn.Parameter(torch.zeros(d_model))
        setattr(self, self.encoder_weights[0], nn.Parameter(torch.empty(d_model, width)))
        for name in self.latent_vectors:
            setattr(self, name, nn.Parameter(torch.zeros(width)))
        self.W_dec = nn.Parameter(torch.empty(width, d_model))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Decoder rows as random directions (``_init_decoder``), the encoder as the
        decoder's transpose, ``b_pre`` and ``latent_vectors`` 0."""
        self._init_decoder()
        getattr(self, self.encoder_weights[0]).copy_(self.W_dec.T)
        for name in self.latent_vectors:
            getattr(self, name).zero_()
        self.b_pre.zero_()

    @torch.no_grad()
    def _init_decoder(self) -> None:
        """Rows of unit norm in uniformly drawn (Kaiming) directions; ReLU overrides it."""
        nn.init.kaiming_uniform_(self.W_dec)
        unit_rows_(self.W_dec)

    # ---- the public interface, in the input's units ------------------------------------

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        # A 0-dim buffer does not promote x's dtype (bf16 stays bf16).
        out = self._forward(x / self.input_scale)
        return out._replace(x_hat=out.x_hat * self.input_scale)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode(x / self.input_scale)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self._decode(codes) * self.input_scale

    def config(self) -> dict[str, Any]:
        """Constructor arguments: with the state dict, all that rebuilds this SAE.

        Read from the attributes named like the ``__init__`` parameters, so a new
        hyperparameter cannot be forgotten here (it is a JSON dict: tuples become lists).
        """
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        config: dict[str, Any] = {"arch": self.arch}
        for name in names:
            value = getattr(self, name)
            config[name] = list(value) if isinstance(value, tuple) else value
        return config

    def decoder_rows(self) -> torch.Tensor:
        """``[n_latents, d]``: the direction each latent adds to the reconstruction."""
        return self.W_dec

    def l0_target(self) -> int | None:
        """Active latents per row the architecture aims at (``k`` of the TopK family), or
        None where sparsity comes from a penalty; reported beside the measured L0."""
        return None

    def needs_calibration(self) -> bool:
        """Whether ``calibrate`` sets anything (the trainer samples rows only then)."""
        return False

    def calibrate(self, rows_nd: torch.Tensor) -> None:
        """Set inference-time statistics from training rows (input units); the trainer
        calls it at the end of each epoch, before validation and the checkpoint. Only
        BatchTopK's threshold has any; the rest need nothing."""

    # ---- hooks the trainer calls each step (no-ops here; architectures override) -------

    def set_progress(self, step: int, total_steps: int) -> None:
        """Training progress, before the step's forward: coefficients with a warm-up (the
        sparsity penalty of ReLU, Gated and JumpReLU) follow it."""

    def before_optimizer_step(self) -> None:
        """After backward, before the optimiser steps (unit-norm decoders drop the gradient
        along their rows)."""

    def after_optimizer_step(self) -> None:
        """After the optimiser step (unit-norm decoders renormalise their rows)."""

    @torch.no_grad()
    def init_b_pre(self, sample_nd: torch.Tensor, method: str = "geometric_median") -> None:
        """Centre the encoder on the data: the geometric median is robust to outlier rows.

        ``b_pre`` is stored in normalised units, so this and ``set_input_scale`` may run in
        either order."""
        if method == "geometric_median":
            centre = geometric_median(sample_nd.float())
        elif method == "mean":
            centre = sample_nd.float().mean(dim=0)
        elif method == "zeros":
            centre = torch.zeros_like(self.b_pre)
        else:
            raise HsaeError(
                f"b_pre init method={method!r} is not known; valid: geometric_median, mean, zeros"
            )
        self.b_pre.copy_(centre.to(self.b_pre) / self.input_scale)

    @torch.no_grad()
    def set_input_scale(self, sample_nd: torch.Tensor) -> float:
        """Set ``input_scale`` to ``sqrt(mean_n ||x_n||^2)`` of a data sample (returned), so
        the architecture sees rows of unit mean squared norm. Call it before training; it
        keeps ``b_pre`` where it is in input units (an ``init_b_pre`` before it stays valid)
        and changes nothing else, so on a trained SAE it changes what the SAE computes."""
        self._check_not_folded("set_input_scale")
        if sample_nd.ndim != 2 or sample_nd.shape[1] != self.d_model or sample_nd.shape[0] == 0:
            raise HsaeError(
                f"set_input_scale needs a [n_rows, d_model={self.d_model}] sample with n_rows "
                f">= 1, got shape {tuple(sample_nd.shape)}; pass rows of the training data"
            )
        scale = sample_nd.double().pow(2).sum(dim=-1).mean().sqrt()
        if not (torch.isfinite(scale) and scale > 0):
            raise HsaeError(
                f"the sample's root mean squared norm is {scale.item()}: the sample is all zeros "
                "or holds NaN/Inf; pass rows of the training data (check the cache)"
            )
        self.b_pre.mul_((self.input_scale.double() / scale).to(self.b_pre))
        self.input_scale.fill_(scale.item())
        return scale.item()

    @torch.no_grad()
    def folded_state_dict(self) -> dict[str, torch.Tensor]:
        """This SAE's state (float32, on the CPU) with ``input_scale`` folded into the
        weights and set to 1: the same codes and reconstructions from raw inputs.

        Exact for every architecture (up to rounding), because each one only ever looks at
        its input through ``(x / s - b_pre) @ W`` for its encoder weights ``W``, which is
        ``(x - s b_pre) @ (W / s)``: pre-activations, and so codes, thresholds, gates and
        biases, are unchanged; and it writes ``s (codes @ W_dec + b_pre)``, which is
        ``codes @ (s W_dec) + s b_pre``. Decoder rows then have norm ``s`` (see
        ``unfold_input_scale``).
        """
        return _rescaled(self, self.input_scale.double(), to_scale=1.0)

    @torch.no_grad()
    def unfold_input_scale(self) -> None:
        """Undo what ``save_sae`` folded in (``folded_input_scale``): back to the training
        form, ``input_scale = s`` and decoder rows as they were trained (unit norm)."""
        scale = self.folded_input_scale
        if scale == 1.0:
            return
        state = _rescaled(self, torch.tensor(1.0 / scale, dtype=torch.float64), to_scale=scale)
        self.load_state_dict(state)
        self.folded_input_scale = 1.0

    def _check_not_folded(self, what: str) -> None:
        if self.folded_input_scale != 1.0:
            raise HsaeError(
                f"{what} on an SAE loaded with its input scale ({self.folded_input_scale:.6g}) "
                "folded into its weights (decoder rows of that norm): load it with "
                "load_sae(path, unfold=True) to train it further"
            )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Files and checkpoints from before input normalisation hold no scale: they are 1.
        state_dict.setdefault(f"{prefix}input_scale", torch.ones(()))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _rescaled(
    sae: SparseAutoencoder, factor: torch.Tensor, to_scale: float
) -> dict[str, torch.Tensor]:
    """State dict (float32, CPU) with encoder weights divided by ``factor``, decoder
    weights and ``b_pre`` multiplied by it, and ``input_scale`` set to ``to_scale``."""
    state: dict[str, torch.Tensor] = {}
    for name, value in sae.state_dict().items():
        value = value.detach().cpu()
        if name in sae.encoder_weights:
            value = value.double() / factor
        elif name in sae.decoder_weights or name == "b_pre":
            value = value.double() * factor
        elif name == "input_scale":
            value = torch.full_like(value, to_scale)
        # Counters (rows since fired, threshold updates) stay integers: float32 would round them.
        state[name] = (value.float() if value.is_floating_point() else value).contiguous()
    return state


def unit_rows_(weight: torch.Tensor) -> torch.Tensor:
    """Divide each row (last axis) of ``weight`` by its norm, in place."""
    return weight.div_(weight.norm(dim=-1, keepdim=True).clamp_min(1e-12))


class UnitNormDecoderMixin:
    """Decoder rows (one per latent) kept at unit norm: renormalise after each optimiser
    step, and drop the gradient component along each row before it, so Adam's steps move
    directions, not lengths. ``unit_norm_decoders`` names the parameters whose last axis is
    a row in input space."""

    unit_norm_decoders: ClassVar[tuple[str, ...]] = ("W_dec",)
    _check_not_folded: Callable[[str], None]

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self._check_not_folded("normalize_decoder")
        for name in self.unit_norm_decoders:
            unit_rows_(getattr(self, name))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        for name in self.unit_norm_decoders:
            weight = getattr(self, name)
            if weight.grad is None:
                continue
            unit = weight / weight.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            parallel = (weight.grad * unit).sum(dim=-1, keepdim=True)
            weight.grad.sub_(parallel * unit)

    def before_optimizer_step(self) -> None:
        self.remove_parallel_grad()

    def after_optimizer_step(self) -> None:
        self.normalize_decoder()


def warmup_scale(step: int, total_steps: int, fraction: float) -> float:
    """Linear ramp from 0 to 1 over the first ``fraction`` of training (1 when fraction=0)."""
    ramp = fraction * total_steps
    return 1.0 if ramp <= 0 else min(1.0, step / ramp)
