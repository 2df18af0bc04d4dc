"""Evaluate a finished run from its run dir alone (step 3), or a backbone's layer (step 1).

Step 3 (``evaluate_run``): the SAE's own metrics on the held-out split (``fvu``, ``l0``,
...), then, per image, the latents' maximum activation over the image's rows and the
SAE's inputs and reconstructions averaged over them, which feed the interpretability
metrics (``interp/...``: purity, entropy, taxonomy depth, MS, uniqueness, Moran's I for
patch tokens, sparse probing, absorption) and probe fidelity (``fidelity/...``). Names:
docs/metrics.md. What cannot be computed is listed with the reason under ``skipped``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsae.cache import ActivationCache, resolve_device
from hsae.config import DatasetConfig
from hsae.errors import HsaeError
from hsae.metrics import make_sae_metrics
from hsae.metrics.reference import reference_embedding
from hsae.metrics.results import skipped_of
from hsae.metrics.sae import max_decoder_cosine
from hsae.sae import WEIGHTS_FILE, load_sae
from hsae.sae.base import SparseAutoencoder

log = logging.getLogger(__name__)


# What evaluation reads from a run's cfg.json (train.py writes these and more).
RUN_CFG_KEYS = ("sae", "cache", "backbone", "dataset")


def read_run_cfg(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise HsaeError(f"run_dir={run_dir} does not exist; pass the folder a train.py run wrote")
    for name in (WEIGHTS_FILE, "cfg.json"):
        if not (run_dir / name).exists():
            raise HsaeError(
                f"run_dir={run_dir} has no {name}: the training run did not finish "
                "(rerun it with the same hydra.run.dir to resume), or this is not a run dir"
            )
    path = run_dir / "cfg.json"
    rewrite = (
        "train.py writes it when a run finishes: rerun train.py with this hydra.run.dir and "
        "skip_finished=false (it resumes from checkpoints/last.ckpt), or restore the file"
    )
    try:
        cfg = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise HsaeError(f"{path} is not valid JSON ({e}): it is damaged; {rewrite}") from None
    missing = [key for key in RUN_CFG_KEYS if key not in cfg] if isinstance(cfg, dict) else None
    if missing is None or missing:
        what = "is not a JSON object" if missing is None else f"has no {missing}"
        raise HsaeError(f"{path} {what}: it is damaged or not a run's config; {rewrite}")
    return cfg


@dataclass
class ImagePass:
    """What one pass over a cache gives, per image (rows grouped by image)."""

    sae_metrics: dict[str, float]
    acts_ik: torch.Tensor  # max activation of each latent over the image's rows
    feats_id: torch.Tensor  # mean SAE input over the image's rows
    recon_id: torch.Tensor  # mean reconstruction over the image's rows
    image_ids: np.ndarray
    moran_k: torch.Tensor | None = None
    notes: dict[str, str] = field(default_factory=dict)


def _patch_grid(cache: ActivationCache) -> tuple[int, int] | None:
    """``(h, w)`` when the rows are exactly a square grid of patch tokens per image."""
    token_index = cache.manifest["token_index"]
    side = math.isqrt(len(token_index))
    contiguous = token_index == list(range(token_index[0], token_index[0] + len(token_index)))
    is_patch = cache.manifest["spec"].get("tokens") == "patch"
    return (side, side) if is_patch and side * side == len(token_index) and contiguous else None


@torch.no_grad()
def image_pass(
    sae: torch.nn.Module, cache: ActivationCache, batch_size: int, device: torch.device
) -> ImagePass:
    from hsae.metrics.interp import MoranAccumulator

    tokens_per_image = cache.manifest["tokens_per_image"]
    rows_per_batch = max(1, batch_size // tokens_per_image) * tokens_per_image
    metrics = make_sae_metrics(sae.d_model, sae.n_latents).to(device)
    grid = _patch_grid(cache)
    moran = MoranAccumulator(sae.n_latents, grid, device) if grid else None
    # Filled in place: a list of batches and its concatenation would hold the [images x
    # latents] activations twice (2 x 4.9 GB at 50,000 images x 24,576 latents).
    n_images = cache.n_rows // tokens_per_image
    acts = torch.empty(n_images, sae.n_latents)
    feats = torch.empty(n_images, sae.d_model)
    recons = torch.empty(n_images, sae.d_model)
    for start in range(0, cache.n_rows, rows_per_batch):
        rows = np.arange(start, min(start + rows_per_batch, cache.n_rows))
        x = cache.read(rows).to(device)
        out = sae(x)
        metrics.update(x, out.x_hat, out.codes)
        n_img, first = len(rows) // tokens_per_image, start // tokens_per_image
        images = slice(first, first + n_img)
        codes = out.codes.float().view(n_img, tokens_per_image, -1)
        acts[images] = codes.amax(dim=1).cpu()
        feats[images] = x.view(n_img, tokens_per_image, -1).mean(dim=1).cpu()
        recons[images] = out.x_hat.float().view(n_img, tokens_per_image, -1).mean(dim=1).cpu()
        if moran is not None:
            moran.update(codes)
    notes = {} if grid else {"interp/moran_i": "needs patch-token rows (backbone.tokens=patch)"}
    return ImagePass(
        sae_metrics={name: float(value) for name, value in metrics.compute().items()},
        acts_ik=acts,
        feats_id=feats,
        recon_id=recons,
        image_ids=cache.row_image(np.arange(0, cache.n_rows, tokens_per_image)),
        moran_k=moran.compute().cpu() if moran else None,
        notes=notes,
    )


def _on_gpu(images: ImagePass, device: torch.device) -> ImagePass:
    """The per-image tensors on the GPU, where the metrics (batched torch, on their inputs'
    device) run fastest, when they take at most half of its free memory; else unchanged."""
    if device.type != "cuda":
        return images
    tensors = (images.acts_ik, images.feats_id, images.recon_id)
    if sum(t.numel() * t.element_size() for t in tensors) > torch.cuda.mem_get_info(device)[0] / 2:
        return images
    acts, feats, recons = (t.to(device) for t in tensors)
    return replace(images, acts_ik=acts, feats_id=feats, recon_id=recons)


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


def latent_groups(sae: torch.nn.Module) -> list[tuple[int, int]] | None:
    """Matryoshka groups: the latent index ranges between successive prefix ends."""
    ends = list(getattr(sae, "ends", []) or [])
    return list(zip([0, *ends[:-1]], ends, strict=True)) if ends else None


# Why a metric that applies to the run can still have no value on its data (NaN).
NAN_REASONS = (
    ("interp/top_overlap", "needs 2 latents firing on >= 5 images (pairs of top-image sets)"),
    ("interp/uniqueness", "needs 2 latents firing on >= 5 images (pairs of top-image sets)"),
    ("interp/taxonomy_depth/group*", "no latent of this group fires on >= 5 images"),
    ("interp/name_agreement@*", "no latent has a clear majority class at this level (> 0.5 of "
     "its top images): interp/majority_latents@<level> = 0"),
    ("interp/name_score", "no latent fires on >= 5 images"),
    ("interp/sparse_probe@*", "no class of this level has images on both sides of the probe's "
     "training and held-out split"),
    ("interp/absorption*", "no parent class with images its probe detects"),
    ("interp/ms", "no latent fires on 2 or more images with distinct activations"),
    ("fidelity/recovered@*", "ablation does not change the probe's accuracy (original = "
     "ablated): there is no gap to recover"),
    ("fidelity/zero_shot_recovered@*", "ablation does not change the zero-shot accuracy "
     "(original = ablated): there is no gap to recover"),
    ("hier/cpcc", "the class-mean distances or the tree distances are constant (collapsed "
     "class means): the correlation is undefined"),
    ("hier/mistake_severity", "the leaf probe makes no mistake on the held-out images"),
    ("hier/hdist@*", "k is more than the number of leaf classes"),
)  # fmt: skip


def expected_metrics(
    level_names: list[str], n_groups: int = 0, probe_ks: tuple[int, ...] = (1, 2, 5)
) -> dict[str, list[str]]:
    """Step 3's metric names by family (``docs/metrics.md``), for a hierarchy with these
    levels (coarse to fine) and ``n_groups`` Matryoshka groups. Control and zero-shot are
    at the coarsest level."""
    top, parents = level_names[0], level_names[:-1]
    return {
        "interp": [
            "interp/scored_latents", "interp/taxonomy_depth",
            *(f"interp/{m}@{lv}" for m in ("purity", "entropy", "level_fraction")
              for lv in level_names),
            *(f"interp/taxonomy_depth/group{g}" for g in range(n_groups)),
            "interp/ms", "interp/top_overlap", "interp/uniqueness", "interp/moran_i",
            *(f"interp/sparse_probe@k{k}/{lv}" for k in probe_ks for lv in level_names),
            *(f"interp/absorption_{m}@{lv}" for m in ("rate", "fraction") for lv in parents),
            "interp/absorption_rate", "interp/absorption_fraction",
        ],
        "fidelity": [
            *(f"fidelity/probe_acc@{lv}/{kind}" for lv in level_names
              for kind in ("original", "reconstructed", "ablated")),
            *(f"fidelity/recovered@{lv}" for lv in level_names),
        ],
        "names": [
            "interp/names_map_r2", "interp/name_score",
            *(f"interp/{m}@{lv}" for m in ("name_agreement", "majority_latents")
              for lv in level_names),
        ],
        "control": [
            *(f"control/{m}@{top}" for m in ("hit_rate", "hit_rate_baseline", "delta_p")),
            "control/n_latents",
        ],
        "zero_shot": [
            *(f"fidelity/zero_shot/{kind}@{top}" for kind in ("original", "spliced", "ablated")),
            f"fidelity/zero_shot_recovered@{top}",
        ],
    }  # fmt: skip


def skip_reason(name: str, skipped: dict[str, str]) -> str | None:
    """The reason ``skipped`` gives for ``name``: its own entry, or a pattern (``control/*``)."""
    if name in skipped:
        return skipped[name]
    return next((why for key, why in skipped.items() if fnmatch.fnmatchcase(name, key)), None)


def account_for(
    metrics: dict[str, float], skipped: dict[str, str], expected: list[str]
) -> dict[str, float]:
    """Nothing vanishes: every ``expected`` name is in the result (NaN when it was not
    computed) and every NaN has a reason in ``skipped`` (filled in place): the one given,
    else ``NAN_REASONS``'s for that metric, else a pointer to its definition."""
    out = dict(metrics)
    for name in expected:
        if name not in out:
            out[name] = math.nan
            if skip_reason(name, skipped) is None:
                skipped[name] = "not computed on this data (the metric function gave no value)"
    for name, value in out.items():
        if isinstance(value, float) and math.isnan(value) and skip_reason(name, skipped) is None:
            skipped[name] = next(
                (why for key, why in NAN_REASONS if fnmatch.fnmatchcase(name, key)),
                "undefined on this data (NaN); docs/metrics.md says when it has no value",
            )
    return out


def control_metrics(
    sae: torch.nn.Module, cache: ActivationCache, images: ImagePass, cfg: dict, split: str,
    n_latents: int = 16, n_images: int = 128, multiple: float = 2.0, level: int = 0,
    seed: int = 0, device: torch.device | str = "cpu", backbone: Any = None,
) -> dict[str, float]:  # fmt: skip
    """Steer the run's backbone with its most label-pure latents (hsae.control): each is
    clamped to ``multiple`` x its maximum activation on images of its own class
    (``clamp_values``), and a linear readout of the tower's output (fit on other images) says whether the prediction
    at hierarchy level ``level`` moves to the latent's class. For a backbone with a text
    tower, also CLIP zero-shot accuracy at that level with the SAE spliced in. ``backbone``:
    the run's backbone when the caller has built it already (``make_run_backbone``)."""
    from hsae.config import BackboneConfig
    from hsae.control import clamp_hit_rate, clamp_values, fit_readout, spliced_zero_shot
    from hsae.data import make_dataset
    from hsae.metrics.interp import top_class

    backbone_cfg = BackboneConfig(**cfg["backbone"])
    if backbone is None:
        backbone = make_run_backbone(cfg, device)
    dataset = make_dataset(DatasetConfig(**cfg["dataset"]), split)
    dataset.transform = backbone.preprocess
    labels_n = torch.as_tensor(cache.labels_nl[images.image_ids, level])
    n_classes = cache.hierarchy.n_classes(level)
    # Each latent's class: the majority label of the images it fires on most.
    acts = images.acts_ik
    top = top_class(acts, labels_n, n_classes, n_top=20)
    eligible = top.n_fired_k >= 5
    order = torch.argsort(torch.where(eligible, top.purity_k, -1.0), descending=True)
    latents = [int(j) for j in order[:n_latents] if eligible[j]]
    if not latents:
        raise HsaeError("no latent fires on 5 or more images; control needs active latents")
    classes = [int(top.class_k[j]) for j in latents]
    values = clamp_values(acts, labels_n, latents, classes, multiple)

    rng = np.random.default_rng(seed)
    order_images = rng.permutation(len(images.image_ids))
    n_fit = min(n_images, len(order_images) // 2)  # half for the readout, half to steer
    fit_idx, test_idx = order_images[:n_fit], order_images[n_fit : n_fit + n_images]
    if n_fit < 2:
        raise HsaeError(f"control needs at least 4 images in the {split} split")

    def load(idx: np.ndarray) -> torch.Tensor:
        return torch.stack([dataset[int(images.image_ids[i])][0] for i in idx]).to(device)

    layer, tokens = backbone_cfg.layer, backbone_cfg.tokens
    readout = fit_readout(backbone, load(fit_idx), labels_n[fit_idx].to(device), n_classes, layer)
    result = clamp_hit_rate(
        backbone, sae, layer, tokens, load(test_idx), labels_n[test_idx].to(device), readout,
        latents, classes, values,
    )  # fmt: skip
    name = cache.hierarchy.level_names[level]
    out = {f"{k}@{name}": v for k, v in result.metrics().items()}
    out["control/n_latents"] = float(len(latents))
    if hasattr(backbone, "encode_text"):  # a CLIP-like backbone: zero-shot with the SAE spliced in
        zero_shot = spliced_zero_shot(
            backbone, sae, layer, tokens, load(test_idx), labels_n[test_idx].to(device),
            list(cache.hierarchy.class_names[level]),
        )  # fmt: skip
        out |= {f"{k}@{name}": v for k, v in zero_shot.items()}
    return out


def make_run_backbone(cfg: dict, device: torch.device | str) -> Any:
    """The run's backbone (``cfg.json``'s ``backbone``), on ``device``."""
    from hsae.backbones import make_backbone
    from hsae.config import BackboneConfig

    backbone = make_backbone(BackboneConfig(**cfg["backbone"]))
    backbone.model.to(device)
    return backbone


def read_vocabulary(path: str | Path) -> list[str]:
    """``names_vocab``: one entry per line, used as written (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise HsaeError(
            f"names_vocab={path} is not a file; pass a text file with one vocabulary entry per "
            "line, or names_vocab=null to name latents by the dataset's class names"
        )
    entries = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not entries:
        raise HsaeError(f"names_vocab={path} has no entries; write one entry per line")
    return entries


@torch.no_grad()
def _encode_text(backbone: Any, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    return torch.cat([
        backbone.encode_text(texts[s : s + batch_size]).float().cpu()
        for s in range(0, len(texts), batch_size)
    ])  # fmt: skip


def automatic_names(
    sae: SparseAutoencoder, cache: ActivationCache, images: ImagePass, cfg: dict, split: str,
    backbone: Any, vocabulary: list[str] | None = None, n_top: int = 50, seed: int = 0,
    max_images: int = 2048, batch_size: int = 64, template: str = "a photo of a {}.",
) -> tuple[dict[str, float], dict[str, Any]]:  # fmt: skip
    """Names latents in the joint image-text space of a backbone with a text tower
    (``hsae.metrics.interp.name_report``): a ridge map from the hooked layer's features
    (the SAE's inputs, pooled per image) to the tower's final image embedding is fit on up
    to ``max_images`` images of the split (seeded), and carries each decoder row into the
    joint space, where the nearest class name (prompt ``template``) or ``vocabulary`` entry
    names it. Returns the metrics (``interp/names_map_r2``: the map's held-out R^2) and
    the per-latent table ``{"columns", "rows"}``."""
    from hsae.data import make_dataset
    from hsae.metrics.interp import fit_joint_map, name_report

    device = next(backbone.model.parameters()).device
    dataset = make_dataset(DatasetConfig(**cfg["dataset"]), split)
    dataset.transform = backbone.preprocess
    chosen = np.sort(np.random.default_rng(seed).permutation(len(images.image_ids))[:max_images])
    layer = cfg["backbone"]["layer"]
    emb = []
    for start in range(0, len(chosen), batch_size):
        ids = images.image_ids[chosen[start : start + batch_size]]
        batch = torch.stack([dataset[int(i)][0] for i in ids]).to(device)
        emb.append(backbone.forward_edited(batch, layer, None).float().cpu())
    joint = fit_joint_map(images.feats_id[torch.as_tensor(chosen)], torch.cat(emb), seed=seed)
    hierarchy = cache.hierarchy
    class_text = [
        _encode_text(backbone, [template.format(c) for c in names])
        for names in hierarchy.class_names
    ]
    report = name_report(
        sae.decoder_rows().detach().float().cpu(), joint.map_de, images.acts_ik,
        cache.labels_nl[images.image_ids], hierarchy, class_text, vocabulary,
        None if vocabulary is None else _encode_text(backbone, vocabulary), n_top=n_top,
    )  # fmt: skip
    log.info(
        "names: joint-space map fit on %d images, held-out R^2 %.3f (ridge %.0e)",
        len(chosen), joint.r2, joint.ridge,
    )  # fmt: skip
    metrics = {"interp/names_map_r2": joint.r2, **report.metrics}
    return metrics, {"columns": report.columns, "rows": report.rows}


def evaluate_run(
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
    browser: bool = False,
) -> dict[str, Any]:
    """Every metric that applies to the run, on a cached split; writes ``eval.json`` (with
    the per-latent names under ``latents`` when the backbone has a text tower) and, with
    ``browser`` (``evaluate.py``'s default), the feature browser ``<run dir>/browser/``."""
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
    tmp = run_dir / ".eval.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(run_dir / "eval.json")
    media = {"latents/names": latents_table} if latents_table is not None else None
    if browser:  # from this pass's activations: no second pass over the cache
        from hsae.browser import write_run_browser

        pages = write_run_browser(
            run_dir, sae=sae, cache=cache, acts_ik=images.acts_ik, image_ids=images.image_ids,
            split=split, device=dev, n_top=n_top,
        )  # fmt: skip
        media = (media or {}) | pages.wandb_media
    _log_eval_to_wandb(run_dir, cfg, metrics, media)
    return metrics


def _log_eval_to_wandb(
    run_dir: Path, cfg: dict, metrics: dict[str, float], media: dict[str, Any] | None = None
) -> None:
    """When the run was tracked in W&B, its evaluation becomes a W&B run of job_type
    ``eval`` in the same project and group, named ``<run name>/eval``, with the run's flat
    config, so the dashboard puts step-3 metrics next to training's (and ``media``, e.g.
    the per-latent names table ``latents/names``)."""
    from hsae.config import LoggerConfig, flatten
    from hsae.tracking import log_standalone_run

    logger = cfg.get("config", {}).get("logger", {})
    if logger.get("kind") != "wandb":
        return
    tracking = cfg.get("tracking", {})
    fields = LoggerConfig.__dataclass_fields__
    logger_cfg = LoggerConfig(**{k: v for k, v in logger.items() if k in fields})
    name = f"{tracking.get('name') or run_dir.name}/eval"
    config_flat = flatten(cfg["config"])
    log_standalone_run(
        logger_cfg, run_dir / "eval", name, tracking.get("group"), "eval", config_flat, metrics,
        media,
    )  # fmt: skip


def hierarchy_of_backbone(
    backbone_cfg: Any,
    dataset_cfg: Any,
    cache_cfg: Any,
    split: str,
    out_dir: str | Path,
    device: str,
) -> tuple[dict[str, float], Path]:
    """Step 1: hierarchy metrics (``hier/...``) of one backbone layer's cached activations,
    one row per image (rows of an image averaged); written to ``out_dir``."""
    from dataclasses import asdict

    from hsae.backbones import make_backbone
    from hsae.cache import CacheRequest, get_or_build
    from hsae.data import make_dataset
    from hsae.metrics.hierarchy import hierarchy_metrics

    backbone = make_backbone(backbone_cfg)
    if dataset_cfg.name == "hierarcaps":
        metrics = hierarcaps_of_backbone(
            backbone, backbone_cfg.layer, dataset_cfg, resolve_device(device)
        )
        skipped = skipped_of(metrics)
        metrics = account_for(metrics, skipped, list(HIERARCAPS_METRICS))
        path = _write_step1(out_dir, backbone_cfg, dataset_cfg, split, None, metrics, skipped)
        return metrics, path
    request = CacheRequest.from_config(backbone_cfg, cache_cfg)
    cache = get_or_build(
        cache_cfg.dir, backbone, asdict(backbone_cfg), make_dataset(dataset_cfg, split), request
    )
    tokens_per_image = cache.manifest["tokens_per_image"]
    feats = cache.load_all().view(-1, tokens_per_image, cache.d_model).mean(dim=1)
    image_ids = cache.row_image(np.arange(0, cache.n_rows, tokens_per_image))
    feats = feats.to(resolve_device(device))
    metrics = hierarchy_metrics(feats, cache.labels_nl[image_ids], cache.hierarchy)
    skipped = skipped_of(metrics)
    metrics = account_for(metrics, skipped, expected_step1(list(cache.hierarchy.level_names)))
    path = _write_step1(out_dir, backbone_cfg, dataset_cfg, split, cache.path, metrics, skipped)
    return metrics, path


HIERARCAPS_METRICS = ("hier/kendall_tau", "hier/retrieval_precision", "hier/retrieval_recall")


def expected_step1(level_names: list[str], hdist_ks: tuple[int, ...] = (1, 5)) -> list[str]:
    """Step 1's metric names (``hierarchy_metrics``) for a hierarchy with these levels."""
    return [
        "hier/cpcc", *(f"hier/probe_acc@{lv}" for lv in level_names), "hier/full_path_acc",
        "hier/consistency", "hier/mistake_severity", *(f"hier/hdist@{k}" for k in hdist_ks),
        *(f"hier/ami@{lv}" for lv in level_names),
    ]  # fmt: skip


def _write_step1(
    out_dir: str | Path, backbone_cfg: Any, dataset_cfg: Any, split: str,
    cache_path: Path | None, metrics: dict[str, float], skipped: dict[str, str],
) -> Path:  # fmt: skip
    from dataclasses import asdict

    out_path = (
        Path(out_dir)
        / f"{backbone_cfg.name}_l{backbone_cfg.layer}_{backbone_cfg.tokens}_{dataset_cfg.name}-{split}.json"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    record = {"backbone": asdict(backbone_cfg), "dataset": asdict(dataset_cfg), "split": split,
              "cache": str(cache_path) if cache_path else None, "metrics": metrics,
              "skipped": skipped}  # fmt: skip
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out_path)
    return out_path


@torch.no_grad()
def hierarcaps_of_backbone(
    backbone: Any, layer: int, dataset_cfg: Any, device: torch.device, batch_size: int = 64
) -> dict[str, float]:
    """Step 1 in the joint image-text space (Alper & Averbuch-Elor 2024) for a backbone with a
    text tower: radial Kendall tau of each caption chain and hierarchical retrieval, from the
    HierarCaps CSV beside ``dataset.path`` and its images (``dataset.max_images``: a seeded
    subset of chains)."""
    from PIL import Image

    from hsae.data.files import HIERARCAPS_CSV
    from hsae.metrics.hierarcaps import hierarcaps_metrics, load_hierarcaps

    if not hasattr(backbone, "encode_text"):
        raise HsaeError(
            f"dataset=hierarcaps measures the joint image-text space, but {backbone.name} has no "
            "text tower here (use an open_clip CLIP, e.g. clip_vit_b32 or tiny_vit, or a Hugging "
            "Face CLIPModel checkpoint with its text weights and tokenizer, e.g. reclip_vit_b32; "
            "the hf loader logs why it loaded only the image tower)"
        )
    image_dir = Path(dataset_cfg.path)
    data = load_hierarcaps(image_dir.parent / HIERARCAPS_CSV, image_dir)
    chosen = np.arange(len(data))
    if dataset_cfg.max_images is not None and dataset_cfg.max_images < len(data):
        rng = np.random.default_rng(dataset_cfg.seed)
        chosen = np.sort(rng.choice(len(data), size=dataset_cfg.max_images, replace=False))
    backbone.model.to(device)
    image_emb = []
    for start in range(0, len(chosen), batch_size):
        batch = [
            backbone.preprocess(Image.open(data.image_paths[i]).convert("RGB"))
            for i in chosen[start : start + batch_size]
        ]
        image_emb.append(backbone.forward_edited(torch.stack(batch).to(device), layer, None))
    caption_ids = data.caption_ids_cl[chosen]
    used = np.unique(caption_ids)
    text = torch.cat([
        backbone.encode_text([data.captions[i] for i in used[s : s + 256]])
        for s in range(0, len(used), 256)
    ])  # fmt: skip
    remap = np.full(len(data.captions), -1)
    remap[used] = np.arange(len(used))
    local_ids = remap[caption_ids]
    root = backbone.encode_text([""])[0]
    return hierarcaps_metrics(
        torch.cat(image_emb), text[torch.as_tensor(local_ids)], root, local_ids
    )


def format_table(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    lines += [f"{k:<{width}}  {v:.6g}" for k, v in metrics.items()]
    return "\n".join(lines)
