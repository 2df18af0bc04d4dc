"""hsae's SAEs in SAELens' on-disk format (SAELens >= 6), and back.

A SAELens folder holds ``cfg.json`` (``architecture``, ``d_in``, ``d_sae``, ``dtype``,
``device``, ``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``,
the architecture's own fields such as ``k``, and ``metadata``: ``model_name``,
``hook_name``, ...) and ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec``, and the architecture's encoder parameters), which
``sae_lens.SAE.load_from_disk`` reads. SAELens computes, with ``b_dec`` subtracted from
the input first (``apply_b_dec_to_input``), ``z = (x - b_dec) @ W_enc + b_enc`` and

- ``standard``: ``ReLU(z)``                 <- hsae ``relu``
- ``topk``: top ``k`` of ``z``, ReLU'd      <- ``topk``; ``matryoshka`` with ``activation=topk``
- ``jumprelu``: ``ReLU(z) * 1[z > threshold]``  <- ``jumprelu``; ``batchtopk`` and
  ``matryoshka`` (``activation=batchtopk``), whose inference rule is one threshold for every
  latent (SAELens saves its own BatchTopK SAEs the same way)
- ``gated``: ``1[(x - b_dec) @ W_enc + b_gate > 0] * ReLU((x - b_dec) @ (W_enc exp(r_mag)) + b_mag)``
  <- ``gated``

then ``x_hat = codes @ W_dec + b_dec``. hsae's ``b_pre`` is ``b_dec``; the weights are
written with the input scale folded in (``folded_state_dict``), so the codes are hsae's
codes and SAELens needs no normalisation (``normalize_activations="none"``). The
hierarchical SAE has no SAELens counterpart (a child's code depends on its parent's), so it
is refused. ``cfg.json``'s ``metadata.hsae`` holds hsae's config, so ``import_saelens``
rebuilds the very architecture that was exported; only training state (AuxK's rows since
each latent fired, the count of threshold updates) is not carried.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import hsae
from hsae import rundir
from hsae.errors import HsaeError
from hsae.rundir import replace_atomic, tmp_path, write_json
from hsae.sae import WEIGHTS_FILE, load_sae, make_sae
from hsae.sae.base import SparseAutoencoder

SAELENS_CFG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
# SAELens reads a config that claims a version below 6.0 (or none) as the old flat layout.
SAELENS_FORMAT_VERSION = "6.0.0"
HSAE_METADATA_KEY = "hsae"
IMPORTABLE = ("gated", "jumprelu", "standard", "topk")
# At inference these only rescale the input by a constant that training already folded in.
IDENTITY_NORMALIZATIONS = ("none", "expected_average_only_in")


def saelens_architecture(sae: SparseAutoencoder) -> str:
    """The SAELens architecture that computes what ``sae`` computes at inference."""
    if sae.arch == "hierarchical":
        raise HsaeError(
            "sae.arch='hierarchical' cannot be exported to SAELens: SAELens has no "
            "architecture whose child latents fire only with their parent latent; share the "
            f"run's own {WEIGHTS_FILE} (hsae.sae.load_sae reads it) instead"
        )
    # matryoshka: by its selection rule; batchtopk infers with one threshold (jumprelu).
    rule = sae.config().get("activation", sae.arch)
    return {"relu": "standard", "batchtopk": "jumprelu"}.get(rule, rule)


def _saelens_form(
    sae: SparseAutoencoder, state: dict[str, torch.Tensor]
) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """``(architecture, its cfg fields, its weights)`` for a folded state dict."""
    arch = saelens_architecture(sae)
    common = {"W_dec": state["W_dec"], "b_dec": state["b_pre"]}
    if arch == "gated":
        gated = {name: state[name] for name in ("b_gate", "r_mag", "b_mag")}
        return arch, {}, {"W_enc": state["W_gate"], **gated, **common}
    linear = {"W_enc": state["W_enc"], "b_enc": state["b_enc"], **common}
    if arch == "standard":
        return arch, {}, linear
    if arch == "topk":
        return arch, {"k": sae.config()["k"], "rescale_acts_by_decoder_norm": False}, linear
    if sae.arch == "jumprelu":
        return arch, {}, {**linear, "threshold": state["log_threshold"].exp()}
    if int(state["n_threshold_updates"]) == 0:
        raise HsaeError(
            f"this {sae.arch} SAE never trained, so it has no inference threshold yet (its "
            "codes still come from the batch top-k, which SAELens cannot represent); export "
            "it after training"
        )
    # hsae's eval rule z * 1[z > max(theta, 0)] is SAELens' ReLU(z) * 1[z > threshold].
    threshold = state["threshold"].clamp_min(0).expand(sae.n_latents).clone()
    return arch, {}, {**linear, "threshold": threshold}


def export_saelens(
    sae: SparseAutoencoder, out_dir: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``sae`` as a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) at
    ``out_dir``; ``metadata`` (``model_name``, ``hook_name``, ...) goes into the config's
    ``metadata``. Returns ``out_dir``."""
    state = sae.folded_state_dict()
    arch, fields, weights = _saelens_form(sae, state)
    reserved = {"sae_lens_version", HSAE_METADATA_KEY} & set(metadata or {})
    if reserved:
        raise HsaeError(f"metadata keys {sorted(reserved)} are written by hsae; drop them")
    cfg = {
        "architecture": arch,
        "d_in": sae.d_model,
        "d_sae": sae.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **fields,
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            **(metadata or {}),
            HSAE_METADATA_KEY: {
                "config": sae.config(),
                "folded_input_scale": float(sae.input_scale) * sae.folded_input_scale,
                "version": hsae.__version__,
            },
        },
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights_path = out / SAELENS_WEIGHTS_FILE
    tmp = tmp_path(weights_path)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
    replace_atomic(tmp, weights_path)
    write_json(out / SAELENS_CFG_FILE, cfg)
    return out


def _read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    for name in (SAELENS_CFG_FILE, SAELENS_WEIGHTS_FILE):
        if not (folder / name).exists():
            raise HsaeError(
                f"{folder} has no {name}: pass a folder SAELens' save_model or "
                "hsae's export_saelens wrote"
            )
    cfg = json.loads((folder / SAELENS_CFG_FILE).read_text())
    weights = {k: v.float() for k, v in load_file(str(folder / SAELENS_WEIGHTS_FILE)).items()}
    return cfg, weights


def _check_cfg(cfg: dict[str, Any], folder: Path) -> str:
    arch = cfg.get("architecture")
    if arch not in IMPORTABLE:
        raise HsaeError(
            f"{folder}: SAELens architecture {arch!r} has no hsae counterpart; importable: "
            f"{', '.join(IMPORTABLE)} (configs older than SAELens 6 name no architecture)"
        )
    norm = cfg.get("normalize_activations", "none")
    if norm not in IDENTITY_NORMALIZATIONS:
        raise HsaeError(
            f"{folder}: normalize_activations={norm!r} changes each input at inference, which "
            f"hsae's SAEs do not; importable: {', '.join(IDENTITY_NORMALIZATIONS)}"
        )
    if cfg.get("reshape_activations", "none") != "none":
        raise HsaeError(
            f"{folder}: reshape_activations={cfg['reshape_activations']!r} (attention heads) "
            "is not supported; hsae's SAEs take flat [n, d_in] rows"
        )
    return arch


def _normalise_weights(arch: str, cfg: dict[str, Any], w: dict[str, torch.Tensor]) -> None:
    """In place: bring a SAELens state into hsae's conventions (``b_dec`` subtracted from
    the input, decoder norms not rescaling the codes)."""
    if not cfg.get("apply_b_dec_to_input", True):
        # z = x W + b = (x - b_dec) W + (b + b_dec W): the same codes with b_dec subtracted.
        shift = w["b_dec"] @ w["W_enc"]
        if arch == "gated":
            w["b_gate"] = w["b_gate"] + shift
            w["b_mag"] = w["b_mag"] + shift * w["r_mag"].exp()
        else:
            w["b_enc"] = w["b_enc"] + shift
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens ranks z * |W_dec row| and decodes codes / |row| @ W_dec: fold the norms in.
        norms = w["W_dec"].norm(dim=-1).clamp_min(1e-8)
        w["W_enc"], w["b_enc"] = w["W_enc"] * norms, w["b_enc"] * norms
        w["W_dec"] = w["W_dec"] / norms[:, None]


def _hsae_state(
    sae: SparseAutoencoder, arch: str, w: dict[str, torch.Tensor], folder: Path
) -> dict[str, torch.Tensor]:
    """The hsae state dict that computes what SAELens' ``arch`` computes with ``w``."""
    state = {"W_dec": w["W_dec"], "b_pre": w["b_dec"]}
    if arch == "gated":
        state |= {"W_gate": w["W_enc"], **{n: w[n] for n in ("b_gate", "r_mag", "b_mag")}}
    else:
        state |= {"W_enc": w["W_enc"], "b_enc": w["b_enc"]}
    if arch == "jumprelu":
        threshold = w["threshold"]
        if sae.arch == "jumprelu":
            if not (threshold > 0).all():
                raise HsaeError(
                    f"{folder}: {int((threshold <= 0).sum())} JumpReLU thresholds are <= 0; "
                    "hsae's JumpReLU keeps them positive (it learns their log), so it cannot "
                    "hold this SAE"
                )
            state["log_threshold"] = threshold.log()
        else:  # batchtopk / matryoshka: one threshold for every latent
            if not (threshold == threshold[0]).all():
                raise HsaeError(
                    f"{folder}: the config names hsae arch {sae.arch!r}, but its thresholds "
                    "differ between latents; it was not written by export_saelens"
                )
            state["threshold"] = threshold[0].clone()
            state["n_threshold_updates"] = torch.ones((), dtype=torch.long)  # estimated
    return state


def _make_counterpart(
    arch: str, cfg: dict[str, Any], hsae_cfg: dict[str, Any] | None, folder: Path
) -> SparseAutoencoder:
    d_model, n_latents = int(cfg["d_in"]), int(cfg["d_sae"])
    if hsae_cfg is not None:
        sae = make_sae(**hsae_cfg)
        if (sae.d_model, sae.n_latents, saelens_architecture(sae)) != (d_model, n_latents, arch):
            raise HsaeError(
                f"{folder}: metadata.hsae.config is a [{sae.d_model}, {sae.n_latents}] "
                f"{sae.arch} SAE, but the SAELens config a [{d_model}, {n_latents}] {arch} one; "
                "the folder was edited after export (drop metadata.hsae to import it as "
                f"SAELens' {arch})"
            )
        return sae
    if arch == "standard":
        return make_sae("relu", d_model=d_model, n_latents=n_latents)
    if arch == "topk":
        return make_sae("topk", d_model=d_model, n_latents=n_latents, k=int(cfg["k"]))
    return make_sae(arch, d_model=d_model, n_latents=n_latents)


def import_saelens(folder: str | Path) -> SparseAutoencoder:
    """Rebuild an hsae SAE from a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``):
    the architecture ``export_saelens`` wrote (from ``metadata.hsae``), else hsae's
    counterpart of SAELens' (standard -> relu, topk, jumprelu, gated), with SAELens'
    defaults for the training hyperparameters it does not store. Returned in eval mode."""
    folder = Path(folder)
    cfg, weights = _read_folder(folder)
    arch = _check_cfg(cfg, folder)
    _normalise_weights(arch, cfg, weights)
    hsae_meta = (cfg.get("metadata") or {}).get(HSAE_METADATA_KEY) or {}
    sae = _make_counterpart(arch, cfg, hsae_meta.get("config"), folder)
    state = sae.state_dict()
    for name, value in _hsae_state(sae, arch, weights, folder).items():
        if value.shape != state[name].shape:
            raise HsaeError(
                f"{folder}: weight for {name} has shape {tuple(value.shape)}, hsae's "
                f"{sae.arch} SAE of d_in={sae.d_model}, d_sae={sae.n_latents} expects "
                f"{tuple(state[name].shape)}"
            )
        state[name] = value
    sae.load_state_dict(state)
    # Exported decoders carry hsae's folded input scale: see load_sae(unfold=...).
    sae.folded_input_scale = float(hsae_meta.get("folded_input_scale", 1.0))
    return sae.eval()


def _hook_name(cfg: dict[str, Any], layer: int) -> str:
    """The hooked module's path: from ``cfg.json``'s ``layer.name`` if it records it, else
    the training cache's manifest, else ``blocks.<layer>``."""
    layer_info = cfg.get("layer")
    if isinstance(layer_info, dict) and layer_info.get("name"):
        return str(layer_info["name"])
    cache_dir = (cfg.get("cache") or {}).get("train")
    manifest_path = Path(cache_dir) / "manifest.json" if cache_dir else None
    if manifest_path is not None and manifest_path.exists():
        name = (json.loads(manifest_path.read_text()).get("layer") or {}).get("name")
        if name:
            return str(name)
    return f"blocks.{layer}"


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Export a training run (``sae.safetensors`` + ``cfg.json``) as a SAELens folder, with
    SAELens' ``model_name`` (the backbone's) and ``hook_name`` (the hooked layer's module
    path where the run records it, else ``blocks.<layer>``) filled in."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / rundir.CFG
    for path in (cfg_path, run_dir / WEIGHTS_FILE):
        if not path.exists():
            raise HsaeError(f"{path} does not exist: pass the folder a finished train.py run wrote")
    cfg = json.loads(cfg_path.read_text())
    backbone = cfg.get("backbone") or {}
    missing = [k for k in ("model_name", "layer") if backbone.get(k) is None]
    if missing:
        raise HsaeError(
            f"{cfg_path} has no backbone.{', backbone.'.join(missing)}; it was not written "
            "by hsae's train.py"
        )
    dataset = cfg.get("dataset") or {}
    metadata = {
        "model_name": backbone["model_name"],
        "hook_name": _hook_name(cfg, int(backbone["layer"])),
        "model_class_name": backbone.get("loader"),  # hsae backbone loader, e.g. open_clip
        "model_pretrained": backbone.get("pretrained"),
        "backbone_name": backbone.get("name"),
        "layer": backbone["layer"],
        "tokens": backbone.get("tokens"),  # which tokens the SAE saw: cls | patch | mean | all
        "dataset_name": dataset.get("name"),
    }
    return export_saelens(load_sae(run_dir), out_dir, metadata)
