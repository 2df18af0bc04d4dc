"""Typed schemas for every config group, registered with Hydra's ConfigStore.

The YAML files under ``conf/`` are merged onto these dataclasses, so a misspelt key or a
value of the wrong type fails when the config is composed. ``__post_init__`` checks run
when a config is turned into objects (``to_objects``) and say how to fix a bad value.
"""

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from hsae.config.study import StudyConfig
from hsae.errors import HsaeError

TOKENS = ("cls", "patch", "mean", "all", "segments")  # segments: CAST's segment tokens
CACHE_DTYPES = ("float16", "bfloat16", "float32")
BACKBONE_LOADERS = ("open_clip", "hf", "timm", "torchvision", "stand_in", "cast")
# matryoshka: the nested groups' shares of the dictionary; prefixes double in width.
MATRYOSHKA_GROUP_FRACTIONS = (0.0625, 0.0625, 0.125, 0.25, 0.5)
REFERENCES = ("edges", "pixels", "none")  # and backbone:<config name> (hsae.metrics.reference)
REFERENCE_BACKBONE_PREFIX = "backbone:"
DATASETS = (
    "synthetic",
    "synthetic_tree",
    "image_folder",
    "imagenet",
    "cifar100",
    "hierarcaps",
    "activations",
)


def _check_choice(what: str, value: object, valid: tuple) -> None:
    if value not in valid:
        raise HsaeError(
            f"{what}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}"
        )


def _check_positive(what: str, value: float) -> None:
    if value <= 0:
        raise HsaeError(f"{what}={value} must be > 0")


@dataclass
class BackboneConfig:
    name: str = MISSING  # the config's name, e.g. tiny_vit; used in run names and W&B tags
    loader: str = "open_clip"  # open_clip | hf | timm | torchvision
    # open_clip: model config name (its own or hsae's model_configs); hf: hub id or local
    # folder; timm: model name with optional tag; torchvision: builder name (resnet50)
    model_name: str = MISSING
    # Where the weights come from. None = random init (open_clip, timm, torchvision).
    # open_clip: tag or checkpoint path; timm: "hub" or checkpoint path; torchvision: weights
    # name (IMAGENET1K_V1, DEFAULT) or state-dict path; hf: optional hub revision to pin.
    pretrained: Optional[str] = None  # noqa: UP045
    init_seed: int = 0  # seeds the random initialisation when pretrained is None
    d_model: int = MISSING  # width of the hooked blocks; checked against the model when loaded
    layer: int = MISSING  # block index whose output is captured (0-based)
    tokens: str = "cls"  # cls | patch | mean | all | segments (CAST)
    # stand_in: overrides of the training recipe (hsae.backbones.stand_in.train.Recipe),
    # e.g. {steps: 50}; part of the stand-in's store hash.
    recipe: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_choice("backbone.tokens", self.tokens, TOKENS)
        _check_choice("backbone.loader", self.loader, BACKBONE_LOADERS)
        _check_positive("backbone.d_model", self.d_model)


@dataclass
class DatasetConfig:
    name: str = MISSING
    image_size: int = 64
    n_train: int = 4096
    n_val: int = 1024
    seed: int = 0  # synthetic: the images; file datasets: the max_images subset and split
    max_images: Optional[int] = None  # noqa: UP045 - per split, a seeded random subset
    # The data on disk (checked when the dataset is made, not here, so every config
    # composes on any machine): a folder of images, a CIFAR-100 root, or an activations file.
    path: Optional[str] = None  # noqa: UP045
    val_path: Optional[str] = None  # noqa: UP045 - activations: the val split's file
    # Folders without train/ and val/ subfolders, and activation files without val_path,
    # hold out this seeded fraction as the val split.
    val_fraction: float = 0.1
    hierarchy: Optional[str] = None  # noqa: UP045 - image_folder: class -> ancestors file
    labels: Optional[str] = None  # noqa: UP045 - activations: .npy labels [rows] or [rows, levels]
    key: Optional[str] = None  # noqa: UP045 - activations: tensor name in a .safetensors file
    on_error: str = "skip"  # unreadable images: skip (counted, listed in the manifest) | raise

    def __post_init__(self) -> None:
        _check_choice("dataset.name", self.name, DATASETS)
        _check_positive("dataset.n_train", self.n_train)
        _check_positive("dataset.n_val", self.n_val)
        _check_choice("dataset.on_error", self.on_error, ("skip", "raise"))
        if self.max_images is not None:
            _check_positive("dataset.max_images", self.max_images)
        if not 0 < self.val_fraction < 1:
            raise HsaeError(f"dataset.val_fraction={self.val_fraction} must be in (0, 1)")


@dataclass
class CacheConfig:
    dir: str = "cache"  # root of the content-addressed caches, shared by all runs
    dtype: str = "float16"  # half of float32's disk; SAE inputs are float32 after loading
    shard_rows: int = 262_144
    batch_size: int = 256  # images per backbone forward
    num_workers: int = 0
    device: str = "auto"  # auto = cuda when available
    verify: bool = False  # checksum every shard when a cache is opened (reads it all once)

    def __post_init__(self) -> None:
        _check_choice("cache.dtype", self.dtype, CACHE_DTYPES)
        _check_positive("cache.shard_rows", self.shard_rows)


@dataclass
class SAEConfig:
    arch: str = "topk"
    expansion: int = 8
    n_latents: int = MISSING  # derived: backbone.d_model * sae.expansion
    k: int = 16  # active latents per row; parents per row for hierarchical
    # relu, gated: L1 on Anthropic's April 2024 scale (see hsae.sae.base.l1_scale), warmed up
    # linearly over the first part of training.
    l1_coeff: float = 5.0
    l1_warmup_fraction: float = 0.05
    # topk, batchtopk, matryoshka, hierarchical: AuxK loss for dead latents (Gao et al. 2024).
    k_aux: Optional[int] = None  # noqa: UP045 - None: d_model // 2
    aux_coeff: float = 0.03125  # 1/32, the paper's
    # A latent is dead after this many training rows without firing; null: the fraction of
    # an epoch's rows below, so the window scales with the run (a fixed 1,000,000 exceeded
    # the default run's 163,840 rows: AuxK never switched on and 75% of latents ended dead).
    dead_tokens_threshold: Optional[int] = None  # noqa: UP045
    dead_epoch_fraction: float = 1.0  # one epoch: fired on no training row of the last pass
    # batchtopk, matryoshka: EMA weight of each batch's smallest kept activation in the
    # inference threshold; ~ an average over the last 100 steps: smooth, yet it follows the
    # encoder as it trains.
    threshold_momentum: float = 0.01
    # jumprelu: in pre-activation units (the paper's values assume unit mean squared norm).
    bandwidth: float = 0.001  # the paper's epsilon
    sparsity_coeff: float = 0.001  # lambda: the L0 penalty, in units of the FVU
    sparsity_warmup_fraction: float = 0.1
    init_threshold: float = 0.001  # the paper's theta_0
    # matryoshka: nested groups (prefixes double in width), or random prefixes when > 0.
    group_fractions: list[float] = field(default_factory=lambda: list(MATRYOSHKA_GROUP_FRACTIONS))
    n_random_prefixes: int = 0
    activation: str = "batchtopk"  # topk | batchtopk inside matryoshka; Bussmann et al.'s
    # hierarchical: children per parent (n_latents = parents * (1 + n_children)), active per parent.
    n_children: int = 3  # 1 + 3 divides the usual power-of-two widths
    k_child: int = 1  # the paper: one child per active parent
    parent_recon_coeff: float = 0.0  # hsae addition: parents also reconstruct alone (0 = paper)

    def __post_init__(self) -> None:
        _check_positive("sae.n_latents", self.n_latents)
        n_k = self.n_latents
        if self.arch == "hierarchical":
            _check_positive("sae.n_children", self.n_children)
            if self.n_latents % (1 + self.n_children):
                raise HsaeError(
                    f"sae.n_latents={self.n_latents} must be a multiple of 1 + sae.n_children "
                    f"({1 + self.n_children}); change sae.expansion or sae.n_children"
                )
            n_k = self.n_latents // (1 + self.n_children)
            if not 0 < self.k_child <= self.n_children:
                raise HsaeError(
                    f"sae.k_child={self.k_child} must be in 1..sae.n_children ({self.n_children})"
                )
        uses_k = self.arch in ("topk", "batchtopk", "matryoshka", "hierarchical")
        if uses_k and not 0 < self.k <= n_k:
            raise HsaeError(
                f"sae.k={self.k} must be in 1..{n_k} for sae.arch={self.arch}; lower sae.k"
            )
        if self.l1_coeff < 0:
            raise HsaeError(f"sae.l1_coeff={self.l1_coeff} must be >= 0 (Anthropic's recipe: ~5)")
        for name in ("l1_warmup_fraction", "sparsity_warmup_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise HsaeError(f"sae.{name}={getattr(self, name)} must be in [0, 1]")
        if self.k_aux is not None and self.k_aux <= 0:
            raise HsaeError(f"sae.k_aux={self.k_aux} must be > 0, or null for d_model // 2")
        if self.aux_coeff < 0:
            raise HsaeError(f"sae.aux_coeff={self.aux_coeff} must be >= 0 (0 turns AuxK off)")
        if self.dead_tokens_threshold is not None:
            _check_positive("sae.dead_tokens_threshold", self.dead_tokens_threshold)
        if not self.dead_epoch_fraction > 0:
            raise HsaeError(
                f"sae.dead_epoch_fraction={self.dead_epoch_fraction} must be > 0 (a fraction "
                "of an epoch's rows; or set sae.dead_tokens_threshold=<rows>)"
            )
        if not 0 < self.threshold_momentum <= 1:
            raise HsaeError(f"sae.threshold_momentum={self.threshold_momentum} must be in (0, 1]")
        _check_positive("sae.bandwidth", self.bandwidth)
        _check_positive("sae.init_threshold", self.init_threshold)
        if self.sparsity_coeff < 0:
            raise HsaeError(f"sae.sparsity_coeff={self.sparsity_coeff} must be >= 0")
        if not self.group_fractions or min(self.group_fractions) <= 0:
            raise HsaeError(f"sae.group_fractions={list(self.group_fractions)} must be numbers > 0")
        if abs(sum(self.group_fractions) - 1) > 1e-6:
            raise HsaeError(
                f"sae.group_fractions={list(self.group_fractions)} sums to "
                f"{sum(self.group_fractions):.6g}; the groups must share out the dictionary (sum to 1)"
            )
        if self.n_random_prefixes < 0:
            raise HsaeError(f"sae.n_random_prefixes={self.n_random_prefixes} must be >= 0")
        _check_choice("sae.activation", self.activation, ("topk", "batchtopk"))
        if self.parent_recon_coeff < 0:
            raise HsaeError(f"sae.parent_recon_coeff={self.parent_recon_coeff} must be >= 0")

    def dead_rows(self, rows_per_epoch: int) -> int:
        """The dead-latent window in rows: ``dead_tokens_threshold`` when set, else
        ``dead_epoch_fraction`` of the rows one epoch trains on."""
        if self.dead_tokens_threshold is not None:
            return self.dead_tokens_threshold
        return max(1, round(self.dead_epoch_fraction * rows_per_epoch))


@dataclass
class OptimConfig:
    batch_size: int = 1024  # rows per optimiser step (global, across all ranks)
    epochs: int = 10
    lr: Optional[float] = None  # noqa: UP045 - None: 2e-4 / sqrt(n_latents / 16384), as in sparsify
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # linear decay to 0 over the last part of training
    b_pre_init: str = "geometric_median"  # geometric_median | mean | zeros
    # Scale inputs to unit mean squared norm (folded into the weights on save), so one set
    # of hyperparameters (L1 coefficients, JumpReLU thresholds) transfers across backbones.
    normalize_inputs: bool = True
    in_memory: bool = True  # load the whole cache into RAM when it fits
    # With in_memory on a GPU: keep the rows in its memory (when they take at most half of
    # what is free), so batches never cross PCIe.
    on_device: bool = True
    # Compile each SAE's forward with torch.compile (first steps slower, while it compiles).
    compile: bool = False
    num_workers: int = 0

    def __post_init__(self) -> None:
        _check_positive("optim.batch_size", self.batch_size)
        _check_positive("optim.epochs", self.epochs)
        _check_choice("optim.b_pre_init", self.b_pre_init, ("geometric_median", "mean", "zeros"))
        if not 0 <= self.decay_fraction <= 1:
            raise HsaeError(f"optim.decay_fraction={self.decay_fraction} must be in [0, 1]")


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | csv
    project: str = "hsae"
    entity: Optional[str] = None  # noqa: UP045
    mode: Optional[str] = None  # noqa: UP045 - online | offline | None: online only with credentials
    group: Optional[str] = None  # noqa: UP045 - the sweep or experiment name
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_choice("logger.kind", self.kind, ("wandb", "csv"))
        _check_choice("logger.mode", self.mode, (None, "online", "offline"))


@dataclass
class RunConfig:
    task_name: str = "train"
    seed: int = 0
    objective: str = "fvu"  # the metric train.py returns to Hydra sweepers (Optuna)
    skip_finished: bool = True  # a run dir that already holds metrics.json is not retrained
    # With target_l0 set, train.py returns objective + l0_penalty * |ln(l0 / target_l0)|,
    # so a search (Optuna) finds the best objective at that sparsity.
    target_l0: Optional[float] = None  # noqa: UP045
    l0_penalty: float = 1.0
    # An SAE bank: several SAEs trained together on the same batches, each with its own run
    # dir under bank/ (docs/training.md). Each entry overrides fields of `sae` and may set
    # `lr`, e.g. bank=[{k:8},{k:32,expansion:16},{arch:relu,l1_coeff:5}]; null: one SAE.
    bank: Optional[list[dict[str, Any]]] = None  # noqa: UP045
    # The whole study (hsae.study, conf/study/): python train.py study=default; null: one job.
    study: Optional[StudyConfig] = None  # noqa: UP045
    backbone: BackboneConfig = MISSING
    dataset: DatasetConfig = MISSING
    sae: SAEConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class EvalConfig:
    run_dir: Optional[str] = None  # noqa: UP045 - step 3: evaluate one run
    compare: Optional[str] = None  # noqa: UP045 - compare every run under this folder
    # Step 1 alone: the hierarchy of a backbone's representation (backbone=... layer=...).
    backbone: Optional[BackboneConfig] = None  # noqa: UP045
    layer: Optional[int] = None  # noqa: UP045 - shorthand for backbone.layer
    dataset: Optional[DatasetConfig] = None  # noqa: UP045
    cache: CacheConfig = field(default_factory=CacheConfig)
    x: Optional[str] = None  # noqa: UP045 - compare: an extra plot of y against x (config key or metric)
    y: Optional[str] = None  # noqa: UP045
    split: str = "val"
    batch_size: int = 4096
    device: str = "auto"
    interp: bool = True  # step-3 metrics (interp/..., fidelity/...) besides the SAE's own
    control: bool = True  # steer the backbone with the purest latents (control/...)
    names: bool = True  # name latents with the backbone's text tower, if any (interp/name...)
    names_vocab: Optional[str] = None  # noqa: UP045 - a file, one entry per line; default: class names
    # MS reference embedding, the same for every backbone (hsae.metrics.reference):
    # edges | pixels | backbone:<conf/backbone name> | none
    reference: str = "edges"
    n_top: int = 50  # top-activating images per latent for purity, depth, uniqueness
    out_dir: str = "runs/hierarchy"  # step 1 writes <out_dir>/<backbone>_l<layer>_<tokens>.json
    export_saelens: Optional[str] = None  # noqa: UP045 - with run_dir: write the SAE in SAELens' format here
    browser: bool = True  # with run_dir: the feature browser in <run dir>/browser/ (hsae.browser)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # compare: where its W&B run goes

    def __post_init__(self) -> None:
        modes = [self.run_dir is not None, self.compare is not None, self.backbone is not None]
        if sum(modes) != 1:
            raise HsaeError(
                "pass exactly one of run_dir=<run dir> (evaluate a run), compare=<multirun dir> "
                "(compare its runs) or backbone=<name> [layer=<n>] (hierarchy of a backbone)"
            )
        if (self.x is None) != (self.y is None):
            raise HsaeError("compare plots need both x=<key> and y=<key>")
        check_reference(self.reference)


def check_reference(spec: str) -> None:
    """Raise a helpful ``HsaeError`` unless ``spec`` names an MS reference embedding."""
    if spec in REFERENCES:
        return
    if spec.startswith(REFERENCE_BACKBONE_PREFIX) and spec[len(REFERENCE_BACKBONE_PREFIX) :]:
        return
    raise HsaeError(
        f"reference={spec!r} is not valid; choose edges (default: edge orientations, neutral "
        "to every backbone), pixels, none, or backbone:<config name> (a conf/backbone config, "
        "e.g. backbone:dinov2_vit_b14)"
    )


def path_safe(text: str, max_len: int = 120) -> str:
    """A folder name from overrides: no separators, bounded length (long ones hashed)."""
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", str(text))
    if len(safe) > max_len:
        safe = f"{safe[: max_len - 9]}_{hashlib.sha1(safe.encode()).hexdigest()[:8]}"
    return safe


def register_configs() -> None:
    """Register schemas and resolvers; call before Hydra composes (entry points, tests)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    OmegaConf.register_new_resolver("mul", lambda a, b: int(a) * int(b), replace=True)
    OmegaConf.register_new_resolver("path_safe", path_safe, replace=True)


def to_objects(cfg: DictConfig, schema: type) -> Any:
    """Resolve ``cfg`` and build the typed dataclasses, running their checks."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the keys W&B filters and groups by."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
