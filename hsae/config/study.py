"""The study's schema (``study=<name>``, conf/study/; ``hsae.study`` runs it): which backbones
of which kinds, which layers, the SAE grid and seeds, and how the comparison is made. Here,
beside the other config groups' schemas, because ``RunConfig.study`` holds one."""

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from hsae.errors import HsaeError

STUDY_ROLES = ("baseline", "treatment")


@dataclass
class KindConfig:
    """One kind of backbone (e.g. flat-trained), made of one or more backbone units: each
    entry of ``backbones`` crossed with each of ``seeds``."""

    label: str = MISSING  # short name in tables and plots, e.g. flat
    # baseline: the common model; treatment: the kind the hypothesis says is better. The
    # verdict is the treatment minus the baseline, in each metric's better direction.
    role: str = "baseline"
    # Backbone configs (conf/backbone/<name>.yaml), or {config: <name>, layers: [...],
    # overrides: {...}} for one entry's own layers or fields.
    backbones: list[Any] = field(default_factory=list)
    # backbone.init_seed of each unit (stand-ins: the training seed, so several networks per
    # kind); null: each config once, with its own weights (pretrained models).
    seeds: Optional[list[int]] = None  # noqa: UP045
    # Layers compared, by position: the i-th layer of every kind is compared with the i-th of
    # the others (architectures number their blocks differently). null: the config's layer.
    layers: Optional[list[int]] = None  # noqa: UP045
    overrides: dict[str, Any] = field(default_factory=dict)  # backbone.* fields for every unit

    def __post_init__(self) -> None:
        if self.role not in STUDY_ROLES:
            raise HsaeError(
                f"study kind {self.label}: role={self.role!r}; choose one of {STUDY_ROLES}"
            )
        if not self.backbones:
            raise HsaeError(
                f"study kind {self.label} lists no backbones; add backbone config names, "
                "e.g. backbones: [stand_in_flat]"
            )


@dataclass
class StudyConfig:
    name: str = MISSING  # the study's folder: studies/<name> (the Hydra run dir)
    hypothesis: str = (
        "SAEs find more interpretable, more controllable features in backbones trained for "
        "hierarchical consistency than in flat-trained ones"
    )
    kinds: list[KindConfig] = field(default_factory=list)
    dataset: Optional[str] = None  # noqa: UP045 - a conf/dataset config; null: the run's dataset
    dataset_overrides: dict[str, Any] = field(default_factory=dict)  # dataset.* fields
    # The SAE grid, trained as one bank per (backbone unit, layer, SAE seed): every
    # expansion x every k, each member of the bank otherwise the run's `sae` config.
    expansions: list[int] = field(default_factory=lambda: [4, 8])
    ks: list[int] = field(default_factory=lambda: [4, 8, 16])
    sae_overrides: dict[str, Any] = field(default_factory=dict)  # sae.* fields for every SAE
    sae_seeds: list[int] = field(default_factory=lambda: [0, 1])
    # Common L0 values the metric-vs-L0 curves are compared at; null: the grid's k values
    # (for TopK, L0 = k: the comparison is then exact, not interpolated).
    l0_targets: Optional[list[float]] = None  # noqa: UP045
    # Image-level noise: the held-out images are split into halves this many times (pairs of
    # complementary halves); each metric is recomputed on every half (balanced half-samples).
    n_image_halves: int = 2
    n_boot: int = 2000  # hierarchical bootstrap replicates
    ci: float = 0.95
    boot_seed: int = 0
    step1_metric: str = "hier/cpcc"  # the precondition: treatment > baseline on this
    control: bool = True  # step 3's control metrics (steering the backbone)
    names: bool = True  # step 3's automatic names (backbones with a text tower only)
    n_top: int = 50
    eval_batch_size: int = 4096
    # Each SAE's own W&B runs (train, eval); off by default: a study trains dozens of SAEs and
    # each offline W&B run costs seconds. The study's compare run is logged either way.
    log_runs: bool = False
    # Feature-browser pages in <study>/browser/: for each kind, the SAE of its first backbone
    # seed and first SAE seed at the grid's widest point and middle k (the same SAE config for
    # every kind), plus the side-by-side page; report.md links them (docs/browser.md).
    browser: bool = True
    # Torch threads for steps 1-3 (small tensors: one thread is as fast on an idle 2-core CPU
    # and 5-10x faster on a shared one, where threads wait for each other); the stand-ins
    # train with torch's default. null: torch's default throughout.
    threads: Optional[int] = 1  # noqa: UP045
    # Joint image-text hierarchy metrics (step 1 on this dataset config, e.g. hierarcaps) for
    # backbones with a text tower: what differs for a pair with identical image towers.
    joint_dataset: Optional[str] = None  # noqa: UP045
    joint_dataset_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        roles = [k.role for k in self.kinds]
        if roles.count("baseline") != 1 or roles.count("treatment") != 1 or len(roles) != 2:
            raise HsaeError(
                f"study {self.name}: kinds have roles {roles}; a study compares exactly two "
                "kinds, one with role: baseline and one with role: treatment"
            )
        labels = [k.label for k in self.kinds]
        if len(set(labels)) != len(labels):
            raise HsaeError(f"study {self.name}: kind labels {labels} must differ")
        n_layers = {len(k.layers) for k in self.kinds if k.layers is not None}
        if len(n_layers) > 1:
            raise HsaeError(
                f"study {self.name}: kinds list different numbers of layers {sorted(n_layers)}; "
                "layers are compared by position, so give every kind the same number"
            )
        for what, values in (("expansions", self.expansions), ("ks", self.ks)):
            if not values or min(values) <= 0:
                raise HsaeError(f"study.{what}={list(values)} must be a non-empty list of ints > 0")
        if not self.sae_seeds:
            raise HsaeError("study.sae_seeds=[] holds no seed; list at least one")
        if self.n_image_halves < 2 or self.n_image_halves % 2:
            raise HsaeError(
                f"study.n_image_halves={self.n_image_halves} must be an even number >= 2 "
                "(pairs of complementary halves of the held-out images)"
            )
        if not 0 < self.ci < 1:
            raise HsaeError(f"study.ci={self.ci} must be in (0, 1), e.g. 0.95")
        if self.n_boot < 100:
            raise HsaeError(f"study.n_boot={self.n_boot} is too few for an interval; use >= 1000")

    @property
    def baseline(self) -> KindConfig:
        return next(k for k in self.kinds if k.role == "baseline")

    @property
    def treatment(self) -> KindConfig:
        return next(k for k in self.kinds if k.role == "treatment")
