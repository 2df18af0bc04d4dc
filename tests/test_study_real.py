"""Real-backbone studies end to end with random-weight networks (no weights on disk).

- ``study=clip_vs_reclip`` with two small Hugging Face CLIPs that share their image tower and
  differ in the text tower (RE-CLIP's situation): the report names the identical towers,
  calls no vision-side family different, and compares names and the joint image-text
  hierarchy on the HierarCaps test photos.
- ``study=imagenet_vs_clip``'s backbones, each architecture at its real size with random
  weights (``pretrained: null``), built at its configured layer (width and token choice
  checked); the cheapest pair runs the study end to end on a few synthetic images.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import HIERARCAPS_IMAGES
from tests.test_study_report import report_numbers_match

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
TINY_DATA = ["dataset=synthetic", "dataset.n_train=256", "dataset.n_val=128"]
TINY_STUDY = ["study.expansions=[2]", "study.ks=[4,8]", "study.sae_seeds=[0]", "study.n_boot=200",
              "study.n_top=10", "optim.epochs=2", "optim.batch_size=64", "optim.warmup_steps=2"]  # fmt: skip


def _set_kind(cfg, index: int, **fields) -> None:
    OmegaConf.update(cfg, f"study.kinds.{index}", fields, merge=True, force_add=True)


def test_clip_vs_reclip_compares_only_what_differs(compose, tmp_path):
    transformers = pytest.importorskip("transformers")
    from hsae.study.run import RESULTS, run_study
    from tests.test_backbones_hf import save_with_processor, tiny_clip_model, write_clip_tokenizer

    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}
    )
    model = tiny_clip_model()
    clip = write_clip_tokenizer(save_with_processor(model, tmp_path / "clip", processor))
    with torch.no_grad():  # RE-CLIP: only the text tower fine-tuned
        for p in model.text_model.parameters():
            p.add_(0.5)
    reclip = write_clip_tokenizer(save_with_processor(model, tmp_path / "reclip", processor))

    cfg = compose(["study=clip_vs_reclip", *TINY_DATA, *TINY_STUDY, "logger=csv",
                   f"cache.dir={tmp_path / 'cache'}", "+study.joint_dataset_overrides.path="
                   f"{HIERARCAPS_IMAGES}"])  # fmt: skip
    tiny = {"d_model": 32, "layer": 1, "loader": "hf", "pretrained": None}
    _set_kind(
        cfg, 0, backbones=["clip_vit_b32"], layers=[1], overrides={**tiny, "model_name": str(clip)}
    )
    _set_kind(
        cfg,
        1,
        backbones=["reclip_vit_b32"],
        layers=[1],
        overrides={**tiny, "model_name": str(reclip)},
    )
    out = tmp_path / "study"
    results = run_study(cfg, out)

    assert results["comparison"]["identical_towers"], "the shared image tower was not noticed"
    families = {f["family"]: f for f in results["verdict"]["layers"][0]["families"]}
    for key in ("quality", "hierarchy", "monosemanticity", "absorption", "probing", "control"):
        assert families[key]["status"] == "not applicable", key
        assert "identical image towers" in families[key]["reason"]
    assert families["naming"]["effect"] is not None  # names differ through the text towers
    joint = results["comparison"]["layers"][0]["joint"]
    assert joint["hier/kendall_tau"]["effect"] is not None  # HierarCaps, joint space
    text = (out / "report.md").read_text()
    assert "Identical image towers" in text
    assert report_numbers_match(out / "report.md", out / RESULTS) == []


@pytest.mark.parametrize("study", ["imagenet_vs_clip", "cifar100_vs_clip"])
def test_real_architectures_build_at_their_study_layers(compose, study):
    """Every backbone of the study, real architecture, random weights, at its unit's layer:
    width and token choice as configured."""
    from hsae.backbones import make_backbone
    from hsae.config import BackboneConfig, RunConfig, to_objects
    from hsae.study.plan import make_units

    units = make_units(to_objects(compose([f"study={study}"]), RunConfig).study)
    assert {u.config for u in units} >= {"timm_deit_s16", "timm_vit_b16", "torchvision_alexnet",
                                         "torchvision_resnet50", "clip_vit_b32"}  # fmt: skip
    for unit in units:
        backbone = make_backbone(BackboneConfig(**(unit.backbone | {"pretrained": None})))
        assert backbone.check_layer(unit.backbone["layer"]).d_model == unit.backbone["d_model"]
        del backbone


def test_supervised_vs_clip_runs_end_to_end_with_random_weights(compose, tmp_path):
    """The study's code path on real architectures: AlexNet (supervised kind) vs CLIP
    ViT-B/32 (random weights), 224 px, a few synthetic images, no control (speed)."""
    from hsae.study.run import RESULTS, run_study

    cfg = compose(["study=imagenet_vs_clip", "dataset=synthetic", "dataset.n_train=96",
                   "dataset.n_val=64", *TINY_STUDY, "study.control=false", "logger=csv",
                   f"cache.dir={tmp_path / 'cache'}", "cache.batch_size=32"])  # fmt: skip
    _set_kind(cfg, 0, overrides={"pretrained": None})
    _set_kind(cfg, 1, backbones=["torchvision_alexnet"], overrides={"pretrained": None})
    out = tmp_path / "study"
    results = run_study(cfg, out)
    assert {u["config"] for u in results["units"]} == {"clip_vit_b32", "torchvision_alexnet"}
    assert len(results["saes"]) == 4 and not results["comparison"]["identical_towers"]
    assert results["comparison"]["paired"] is False
    effect = results["comparison"]["layers"][0]["families"]["hierarchy"]["metrics"][
        "interp/purity@mean"
    ]
    # one network per kind: no backbone-seed replication
    assert list(effect["effect"]["n_units"]) == [1, 1]
    assert report_numbers_match(out / "report.md", out / RESULTS) == []
