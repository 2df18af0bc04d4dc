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

from hsae.errors import HsaeError

TOKENS = ("cls", "patch", "mean", "all")
CACHE_DTYPES = ("float16", "bfloat16", "float32")


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
    loader: str = "open_clip"
    model_name: str = MISSING  # open_clip model name (its own or one of hsae's model_configs)
    pretrained: Optional[str] = None  # noqa: UP045 - open_clip tag or local checkpoint; None = random init
    init_seed: int = 0  # seeds the random initialisation when pretrained is None
    d_model: int = MISSING  # width of the hooked blocks; checked against the model when loaded
    layer: int = MISSING  # block index whose output is captured (0-based)
    tokens: str = "cls"  # cls | patch | mean | all

    def __post_init__(self) -> None:
        _check_choice("backbone.tokens", self.tokens, TOKENS)
        _check_choice("backbone.loader", self.loader, ("open_clip",))
        _check_positive("backbone.d_model", self.d_model)


@dataclass
class DatasetConfig:
    name: str = MISSING
    image_size: int = 64
    n_train: int = 4096
    n_val: int = 1024
    seed: int = 0
    max_images: Optional[int] = None  # noqa: UP045 - cap per split for quick runs

    def __post_init__(self) -> None:
        _check_positive("dataset.n_train", self.n_train)
        _check_positive("dataset.n_val", self.n_val)


@dataclass
class CacheConfig:
    dir: str = "cache"  # root of the content-addressed caches, shared by all runs
    dtype: str = "float16"  # half of float32's disk; SAE inputs are float32 after loading
    shard_rows: int = 262_144
    batch_size: int = 256  # images per backbone forward
    num_workers: int = 0
    device: str = "auto"  # auto = cuda when available

    def __post_init__(self) -> None:
        _check_choice("cache.dtype", self.dtype, CACHE_DTYPES)
        _check_positive("cache.shard_rows", self.shard_rows)


@dataclass
class SAEConfig:
    arch: str = "topk"
    expansion: int = 8
    n_latents: int = MISSING  # derived: backbone.d_model * sae.expansion
    k: int = 16  # active latents per row (TopK)

    def __post_init__(self) -> None:
        _check_positive("sae.n_latents", self.n_latents)
        if not 0 < self.k <= self.n_latents:
            raise HsaeError(f"sae.k={self.k} must be in 1..sae.n_latents ({self.n_latents})")


@dataclass
class OptimConfig:
    batch_size: int = 1024  # rows per optimiser step (global, across all ranks)
    epochs: int = 10
    lr: Optional[float] = None  # noqa: UP045 - None: 2e-4 / sqrt(n_latents / 16384), as in sparsify
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # linear decay to 0 over the last part of training
    b_pre_init: str = "geometric_median"  # geometric_median | mean | zeros
    in_memory: bool = True  # load the whole cache into RAM when it fits
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
    backbone: BackboneConfig = MISSING
    dataset: DatasetConfig = MISSING
    sae: SAEConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class EvalConfig:
    run_dir: str = MISSING
    split: str = "val"
    batch_size: int = 4096
    device: str = "auto"


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
