"""Linear probes (batched torch; deterministic: zero init, full-batch L-BFGS / Newton),
shared by step 1's per-level probes, step 3's probing families and control."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LinearProbe:
    """``logits = ((x - mean) / scale) @ weight + bias``; one column per output."""

    weight_do: torch.Tensor
    bias_o: torch.Tensor
    mean_d: torch.Tensor
    scale_d: torch.Tensor

    def logits(self, feats_nd: torch.Tensor) -> torch.Tensor:
        return ((feats_nd - self.mean_d) / self.scale_d) @ self.weight_do + self.bias_o

    def direction_do(self) -> torch.Tensor:
        """Each output's weight vector in the raw (unstandardised) feature space."""
        return self.weight_do / self.scale_d[:, None]


def _fit_lbfgs(
    feats_nd: torch.Tensor,
    n_out: int,
    loss_of_logits: Callable[[torch.Tensor], torch.Tensor],
    weight_decay: float,
    max_iter: int,
) -> LinearProbe:
    mean = feats_nd.mean(dim=0)
    # Standardising makes one weight decay fit every feature scale; constant features keep
    # scale 1 so they contribute nothing instead of dividing by zero.
    scale = feats_nd.std(dim=0, unbiased=False)
    scale = torch.where(scale > 1e-6 * scale.max().clamp_min(1e-12), scale, torch.ones_like(scale))
    x = (feats_nd - mean) / scale
    weight = torch.zeros(x.shape[1], n_out, device=x.device, requires_grad=True)
    bias = torch.zeros(n_out, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of_logits(x @ weight + bias) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(weight.detach(), bias.detach(), mean, scale)


def fit_linear_probe(
    feats_nd: torch.Tensor,
    labels_n: torch.Tensor,
    n_classes: int,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> LinearProbe:
    """Multinomial logistic regression (softmax over ``n_classes``) with L2 weight decay,
    trained full-batch with L-BFGS on standardised features."""
    labels = labels_n.to(feats_nd.device)
    return _fit_lbfgs(
        feats_nd, n_classes, lambda z: F.cross_entropy(z, labels), weight_decay, max_iter
    )


def fit_ovr_probes(
    feats_nd: torch.Tensor,
    targets_no: torch.Tensor,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
    balanced: bool = True,
) -> LinearProbe:
    """Independent binary logistic probes, one per column of ``targets_no`` (0/1), trained
    together (their losses do not interact). ``balanced`` weights positives and negatives
    equally per column so rare classes are not ignored."""
    y = targets_no.float().to(feats_nd.device)
    if balanced:
        pos = y.mean(dim=0).clamp(1e-6, 1 - 1e-6)
        w = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))
    else:
        w = torch.ones_like(y)
    return _fit_lbfgs(
        feats_nd,
        y.shape[1],
        lambda z: (
            F.binary_cross_entropy_with_logits(z, y, weight=w, reduction="sum")
            / (y.shape[0] * y.shape[1])
        ),
        weight_decay / y.shape[1],
        max_iter,
    )


def fit_binary_probes(
    x_pnk: torch.Tensor,
    y_pn: torch.Tensor,
    weight_decay: float = 1e-3,
    n_iter: int = 30,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``P`` independent class-balanced binary logistic regressions on few features each
    (``k`` small, e.g. a few SAE latents), solved together by batched Newton's method.

    Returns ``(coef_pk, intercept_p, (mean_pk, scale_pk))`` packed as coef, intercept and a
    ``[2, P, k]`` standardisation tensor; use ``binary_probe_logits`` to apply them.
    """
    x = x_pnk.double()
    y = y_pn.double()
    mean = x.mean(dim=1, keepdim=True)
    scale = x.std(dim=1, keepdim=True, unbiased=False)
    scale = torch.where(scale > 1e-9, scale, torch.ones_like(scale))
    xs = torch.cat([(x - mean) / scale, torch.ones_like(x[..., :1])], dim=-1)  # [P, n, k+1]
    pos = y.mean(dim=1, keepdim=True).clamp(1e-6, 1 - 1e-6)
    w = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos)) / y.shape[1]  # sums to 1 per probe
    k1 = xs.shape[-1]
    reg = torch.full((k1,), weight_decay, dtype=x.dtype, device=x.device)
    reg[-1] = 0.0  # the intercept is not penalised
    beta = torch.zeros(x.shape[0], k1, dtype=x.dtype, device=x.device)
    eye = torch.eye(k1, dtype=x.dtype, device=x.device)
    xs_t = xs.transpose(1, 2)
    for _ in range(n_iter):
        p = torch.sigmoid((xs @ beta.unsqueeze(-1)).squeeze(-1))
        grad = (xs_t @ (w * (p - y)).unsqueeze(-1)).squeeze(-1) + reg * beta
        # Weighting xs in its own layout, not through the transposed view, halves the time.
        hess = xs_t @ (xs * (w * p * (1 - p)).unsqueeze(-1)) + torch.diag(reg)
        # A tiny ridge keeps the solve defined for a constant feature (all-zero latent).
        step = torch.linalg.solve(hess + 1e-9 * eye, grad.unsqueeze(-1)).squeeze(-1)
        beta = beta - step
        if float(step.abs().max()) < 1e-10:  # converged (Newton: quadratically)
            break
    standard = torch.stack([mean.squeeze(1), scale.squeeze(1)])
    return beta[:, :-1], beta[:, -1], standard


def binary_probe_logits(
    x_pnk: torch.Tensor, coef_pk: torch.Tensor, intercept_p: torch.Tensor, standard: torch.Tensor
) -> torch.Tensor:
    xs = (x_pnk.double() - standard[0][:, None, :]) / standard[1][:, None, :]
    return torch.einsum("pnk,pk->pn", xs, coef_pk) + intercept_p[:, None]


def balanced_accuracy(pred_pn: torch.Tensor, y_pn: torch.Tensor) -> torch.Tensor:
    """Mean of true-positive and true-negative rates, per row ``p``."""
    y = y_pn.bool()
    pred = pred_pn.bool()
    tpr = (pred & y).sum(1).double() / y.sum(1).clamp_min(1)
    tnr = (~pred & ~y).sum(1).double() / (~y).sum(1).clamp_min(1)
    return 0.5 * (tpr + tnr)
