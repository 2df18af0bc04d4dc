"""Step 3 (``run_step3`` / ``evaluate_run``): every metric that applies to a finished run, from its run dir.

The SAE's own metrics on the held-out split (``fvu``, ``l0``, ...), then the
interpretability metrics (``interp/...``: purity, entropy, taxonomy depth, MS, uniqueness,
Moran's I for patch tokens, sparse probing, absorption), probe fidelity (``fidelity/...``),
names and control. Names: docs/metrics.md. What cannot be computed is listed with the
reason under ``skipped``.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hsae.cache import ActivationCache, resolve_device
from hsae.errors import HsaeError
from hsae.evaluation.control import control_metrics
from hsae.evaluation.inputs import (
    ImagePass,
    _on_gpu,
    image_pass,
    latent_groups,
    make_run_backbone,
    read_run_cfg,
)
from hsae.evaluation.naming import automatic_names, read_vocabulary
from hsae.evaluation.report import _log_eval_to_wandb, account_for, expected_metrics
from hsae.metrics.reference import reference_embedding
from hsae.metrics.results import skipped_of
from hsae.rundir import RunDir, write_json
from hsae.sae import load_sae
from hsae.sae.metrics import max_decoder_cosine

log = logging.getLogger(__name__)


def interpretability(
    sae: torch.nn.Module, cache: ActivationCache, images: ImagePass, cfg: dict, split: str,
    reference: str, n_top: int, seed: int = 0,
) -> tuple[dict[str, float], dict[str, str]]:  # fmt: skip
    from hsae.metrics.interp import fidelity_metrics, interp_metrics

    skipped = dict(images.notes)
    labels = cache.labels_nl[images.image_ids]
    # The MS reference (hsae.metrics.reference): the same for every backbone compared.
    ref = reference_embedding(reference, cfg, split, images.image_ids, images.acts_ik.device)
    if ref is None:
        skipped["interp/ms"] = "reference=none"
    # Every latent's own row (the hierarchical SAE's children too), not one weight matrix.
    decoder = sae.decoder_rows().detach().float().cpu()
    metrics = interp_metrics(
        images.acts_ik, labels, cache.hierarchy,
        decoder_kd=decoder, feats_nd=images.feats_id, ref_emb_ne=ref, moran_i_k=images.moran_k,
        groups=latent_groups(sae), n_top=n_top, seed=seed,
    )  # fmt: skip
    metrics |= fidelity_metrics(
        images.feats_id, images.recon_id, torch.zeros_like(images.feats_id), labels, cache.hierarchy
    )
    n_scored = int(metrics.get("interp/scored_latents", 0))
    if n_scored < 2:
        for name in ("interp/top_overlap", "interp/uniqueness"):
            skipped[name] = (
                f"needs 2 latents firing on >= 5 images (pairs of top-image sets); {n_scored} do"
            )
    skipped |= skipped_of(metrics)  # the metric functions' own reasons for their NaNs
    return metrics, skipped


@dataclass
class Step3Result:
    """What step 3 computed, for what comes after it (W&B, the feature browser, which
    reuses ``images`` instead of a second pass over the cache)."""

    run_dir: Path
    cfg: dict
    split: str
    n_top: int
    metrics: dict[str, float]
    sae: torch.nn.Module
    cache: ActivationCache
    images: ImagePass  # per-image activations on the CPU (``acts_ik``, ``image_ids``)
    device: torch.device
    media: dict[str, Any] = field(default_factory=dict)
    """W&B media of the eval run so far (``latents/names``)."""


def run_step3(
    run_dir: str | Path,
    split: str = "val",
    batch_size: int = 4096,
    device: str = "auto",
    interp: bool = True,
    reference: str = "edges",
    n_top: int = 50,
    control: bool = True,
    names: bool = True,
    names_vocab: str | Path | None = None,
) -> Step3Result:
    """Every metric that applies to the run, on a cached split; writes ``eval.json`` (with
    the per-latent names under ``latents`` when the backbone has a text tower) and returns
    them with the SAE, cache and per-image activations they came from."""
    run_dir = Path(run_dir).resolve()
    cfg = read_run_cfg(run_dir)
    if split not in cfg["cache"]:
        raise HsaeError(f"split={split!r} has no cache in this run; valid: {sorted(cfg['cache'])}")
    vocabulary = read_vocabulary(names_vocab) if names_vocab is not None and names else None
    dev = resolve_device(device)
    sae = load_sae(run_dir).to(dev).eval()
    cache = ActivationCache.open(cfg["cache"][split])
    if cache.d_model != sae.d_model:
        raise HsaeError(
            f"cache {cache.path} has width {cache.d_model}, the SAE expects {sae.d_model}"
        )
    images = image_pass(sae, cache, batch_size, dev)
    metrics: dict[str, float] = dict(images.sae_metrics)
    metrics["max_decoder_cosine"] = float(max_decoder_cosine(sae))
    metrics["n_rows"] = cache.n_rows
    groups = latent_groups(sae)
    families = expected_metrics(list(cache.hierarchy.level_names), len(groups or ()))
    skipped: dict[str, str] = {}
    if interp:
        interp_values, skipped = interpretability(
            sae, cache, _on_gpu(images, dev), cfg, split, reference, n_top, cfg.get("seed", 0)
        )
        metrics |= interp_values
    else:
        for pattern in ("interp/*", "fidelity/probe_acc@*", "fidelity/recovered@*"):
            skipped[pattern] = "interp=false"
    # One backbone for names and control (building it can cost as much as using it).
    no_backbone = cfg["dataset"]["name"] == "activations"
    backbone: Any = None
    if not no_backbone and (control or (interp and names)):
        backbone = make_run_backbone(cfg, dev)
    text_tower = backbone is not None and hasattr(backbone, "encode_text")
    latents_table = None
    names_skip = None
    if not interp:
        names_skip = "interp=false"
    elif not names:
        names_skip = "names=false"
    elif no_backbone:
        names_skip = "no backbone: the run trained on an activations file"
    elif not text_tower:
        names_skip = (
            f"{backbone.name} has no text tower (names need a CLIP-like backbone: open_clip)"
        )
    else:
        names_values, latents_table = automatic_names(
            sae, cache, images, cfg, split, backbone, vocabulary, n_top, cfg.get("seed", 0)
        )
        metrics |= names_values
    if names_skip is not None:
        skipped["interp/name*"] = skipped["interp/majority_latents@*"] = names_skip
    control_skip = None
    if not control:
        control_skip = "control=false"
    elif no_backbone:
        control_skip = "no backbone: the run trained on an activations file"
    else:
        metrics |= control_metrics(
            sae, cache, images, cfg, split, seed=cfg.get("seed", 0), device=dev,
            backbone=backbone,
        )  # fmt: skip
        if not text_tower:
            skipped["fidelity/zero_shot*"] = (
                f"{backbone.name} has no text tower (zero-shot needs a CLIP-like backbone)"
            )
    if control_skip is not None:
        skipped["control/*"] = skipped["fidelity/zero_shot*"] = control_skip
    metrics = account_for(metrics, skipped, [name for v in families.values() for name in v])
    for name, why in skipped.items():
        log.info("skipped %s: %s", name, why)
    record: dict[str, Any] = {"split": split, "metrics": metrics, "skipped": skipped}
    if latents_table is not None:
        record["latents"] = latents_table
    write_json(RunDir(run_dir).eval, record)
    media = {"latents/names": latents_table} if latents_table is not None else {}
    return Step3Result(run_dir, cfg, split, n_top, metrics, sae, cache, images, dev, media)


def evaluate_run(run_dir: str | Path, **step3_kwargs: Any) -> dict[str, Any]:
    """Every metric that applies to the run, on a cached split: ``run_step3`` (writes
    ``eval.json``), then the eval W&B run. The feature browser is built by its caller
    (``hsae.browser.evaluate_with_browser``, what ``evaluate.py`` runs)."""
    result = run_step3(run_dir, **step3_kwargs)
    log_step3(result)
    return result.metrics


# help() and the study read the parameters and their defaults: run_step3's, written once.
evaluate_run.__signature__ = inspect.signature(run_step3).replace(  # type: ignore[attr-defined]
    return_annotation=dict[str, Any]
)


def log_step3(result: Step3Result, media: dict[str, Any] | None = None) -> None:
    """Step 3's metrics and media (``media`` added, e.g. the browser's) to the eval W&B
    run, when the run was tracked in W&B."""
    media = result.media | (media or {})
    _log_eval_to_wandb(result.run_dir, result.cfg, result.metrics, media or None)
