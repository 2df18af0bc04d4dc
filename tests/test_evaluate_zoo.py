"""Every architecture of the zoo trains and evaluates end to end, in-process: one SAE bank
(all seven architectures on the same batches, tiny sizes), then ``evaluate_run`` on each
member's run dir. Every metric family is in ``eval.json``: a number, or NaN with its reason
under ``skipped``. Nothing vanishes silently, also on a degenerate SAE (one live latent)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from hsae.evaluation import evaluate_run
from hsae.sae import SAE_REGISTRY, TopKSAE, save_sae
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = tuple(SAE_REGISTRY)
LEVELS = ("family", "shape", "variant")
# One name per family, as docs/metrics.md lists them; each must be in eval.json.
FAMILIES = (
    "fvu", "mse", "l0", "l1", "dead_fraction", "dense_fraction", "shrinkage",
    "max_decoder_cosine",
    *(f"interp/{m}@{lv}" for m in ("purity", "entropy", "level_fraction") for lv in LEVELS),
    "interp/scored_latents", "interp/taxonomy_depth", "interp/ms", "interp/top_overlap",
    "interp/uniqueness", "interp/moran_i",
    *(f"interp/sparse_probe@k{k}/{lv}" for k in (1, 2, 5) for lv in LEVELS),
    *(f"interp/absorption_{m}@{lv}" for m in ("rate", "fraction") for lv in LEVELS[:-1]),
    "interp/absorption_rate", "interp/absorption_fraction",
    *(f"fidelity/probe_acc@{lv}/{kind}" for lv in LEVELS
      for kind in ("original", "reconstructed", "ablated")),
    *(f"fidelity/recovered@{lv}" for lv in LEVELS),
    "interp/names_map_r2", "interp/name_score",
    *(f"interp/{m}@{lv}" for m in ("name_agreement", "majority_latents") for lv in LEVELS),
    "control/hit_rate@family", "control/hit_rate_baseline@family", "control/delta_p@family",
    "control/n_latents",
    *(f"fidelity/zero_shot/{kind}@family" for kind in ("original", "spliced", "ablated")),
    "fidelity/zero_shot_recovered@family",
)  # fmt: skip


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, compose):
    """``{arch: run dir}``: the seven architectures trained together for one epoch."""
    from hsae.training.run import train

    tmp = tmp_path_factory.mktemp("zoo")
    bank = ",".join(f"{{arch:{arch}}}" for arch in ARCHS)
    cfg = compose([
        *TINY, "dataset.n_train=256", "dataset.n_val=128", "optim.epochs=1",
        "sae.expansion=2", "sae.k=4", f"cache.dir={tmp / 'cache'}", f"bank=[{bank}]",
    ])  # fmt: skip
    train(cfg, tmp / "run")
    dirs = {d.name.split("arch-")[1]: d for d in (tmp / "run" / "bank").iterdir()}
    assert sorted(dirs) == sorted(ARCHS)
    return dirs


def covered(name: str, skipped: dict[str, str]) -> str | None:
    """The reason ``skipped`` gives for ``name`` (its own entry or a ``family/*`` pattern)."""
    import fnmatch

    for pattern, why in skipped.items():
        if fnmatch.fnmatchcase(name, pattern) and why.strip():
            return why
    return None


def assert_accounted(record: dict) -> None:
    metrics, skipped = record["metrics"], record["skipped"]
    for name in FAMILIES:
        assert name in metrics or covered(name, skipped), f"{name} vanished from eval.json"
    for name, value in metrics.items():
        if isinstance(value, float) and math.isnan(value):
            assert covered(name, skipped), f"{name} is NaN without a reason under skipped"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_evaluates_end_to_end(zoo, arch):
    metrics = evaluate_run(zoo[arch], device="cpu")
    record = json.loads((zoo[arch] / "eval.json").read_text())
    assert record["metrics"] == pytest.approx(metrics, nan_ok=True)
    assert_accounted(record)
    assert "patch" in record["skipped"]["interp/moran_i"]  # CLS rows: no patch grid
    # Families this data defines are numbers, for every architecture (absorption and
    # control read every latent's decoder row: the hierarchical SAE's children too).
    for name in ("fvu", "interp/purity@family", "interp/absorption_rate", "control/hit_rate@family",
                 "fidelity/zero_shot/spliced@family", "interp/name_score"):  # fmt: skip
        assert math.isfinite(record["metrics"][name]), (name, record["skipped"])


def test_a_degenerate_sae_gets_nan_and_a_reason_not_a_missing_key(zoo, tmp_path):
    """One latent fires on every row, the rest never: the top-set overlap (pairs of latents)
    is undefined. It is NaN and ``skipped`` says why; every other family is still there."""
    run_dir = tmp_path / "one_latent"
    run_dir.mkdir()
    shutil.copy(zoo["topk"] / "cfg.json", run_dir / "cfg.json")
    sae = TopKSAE(d_model=128, n_latents=8, k=1)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.copy_(torch.tensor([1.0] + [-1.0] * 7))
    save_sae(sae, run_dir)
    evaluate_run(run_dir, device="cpu")
    record = json.loads((run_dir / "eval.json").read_text())
    assert math.isnan(record["metrics"]["interp/top_overlap"])
    assert "2 latents" in record["skipped"]["interp/top_overlap"]
    assert record["metrics"]["interp/scored_latents"] == 1
    assert_accounted(record)


def test_step1_record_lists_every_metric_nan_ones_with_a_reason(monkeypatch, tmp_path):
    """Step 1's JSON: a metric the function leaves out (hdist@5 with fewer than 5 leaves)
    or returns as NaN (CPCC of collapsed class means) is there as NaN, with its reason."""
    import hsae.metrics.hierarchy
    from hsae.config import BackboneConfig, CacheConfig, DatasetConfig
    from hsae.evaluation import hierarchy_of_backbone

    real = hsae.metrics.hierarchy.hierarchy_metrics

    def degenerate(*args, **kwargs):
        out = dict(real(*args, **kwargs))  # a plain dict: no reasons of its own
        del out["hier/hdist@5"]
        out["hier/cpcc"] = math.nan
        return out

    monkeypatch.setattr(hsae.metrics.hierarchy, "hierarchy_metrics", degenerate)
    backbone = BackboneConfig(name="tiny_vit", model_name="hsae-tiny-vit", d_model=128, layer=1)
    metrics, path = hierarchy_of_backbone(
        backbone, DatasetConfig(name="synthetic", n_val=200),
        CacheConfig(dir=str(tmp_path / "cache"), device="cpu"), "val", tmp_path / "out", "cpu",
    )  # fmt: skip
    record = json.loads(path.read_text())
    assert record["metrics"] == pytest.approx(metrics, nan_ok=True)
    for name in ("hier/hdist@5", "hier/cpcc"):
        assert math.isnan(record["metrics"][name]) and record["skipped"][name], name
    assert "collapsed" in record["skipped"]["hier/cpcc"]
    assert math.isfinite(record["metrics"]["hier/hdist@1"])
