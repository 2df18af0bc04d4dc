"""Stand-in backbones: the objectives, the store (reuse, new recipe, damage), the adapter."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hsae.backbones import make_backbone
from hsae.backbones.stand_in import Recipe, ensure_stand_in, load_stand_in
from hsae.backbones.stand_in import store as store_module
from hsae.backbones.stand_in.objectives import batch_cpcc, make_objective
from hsae.config import BackboneConfig
from hsae.data.synthetic_tree import HIERARCHY
from hsae.errors import HsaeError
from hsae.metrics.hierarchy import cpcc
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

# Seconds, not minutes: a few steps of a very small ViT on a few hundred images.
TINY = {
    "n_train": 256,
    "n_val": 108,
    "steps": 3,
    "batch_size": 32,
    "arch_kwargs": {"d_model": 16, "depth": 2, "n_heads": 2, "stem_channels": [8, 8, 16]},
}


@pytest.fixture(autouse=True)
def hsae_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HSAE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def count_training(monkeypatch):
    calls = []
    real = store_module.train_stand_in

    def counted(*args, **kwargs):
        calls.append(args[:3])
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module, "train_stand_in", counted)
    return calls


def _backbone(objective="hier", seed=0, recipe=TINY, layer=1):
    return make_backbone(
        BackboneConfig(
            name=f"stand_in_{objective}",
            loader="stand_in",
            model_name="vit",
            pretrained=objective,
            init_seed=seed,
            d_model=16,
            layer=layer,
            recipe=recipe,
        )
    )


# ---- objectives ---------------------------------------------------------------------


def test_batch_cpcc_equals_the_step1_metric():
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(200, 8, generator=gen)
    leaves = torch.arange(200) % 27
    labels = torch.as_tensor(HIERARCHY.labels_from_leaves(leaves.numpy()))
    tree = torch.as_tensor(HIERARCHY.leaf_distance(), dtype=torch.float32)
    got = batch_cpcc(emb, leaves, tree)
    torch.testing.assert_close(float(got), cpcc(emb, labels, HIERARCHY), atol=1e-5, rtol=0)
    assert float(batch_cpcc(emb[:2], leaves[:2], tree)) == 0.0  # undefined: < 3 classes


def _fit_free_embeddings(objective: str, seed: int) -> float:
    """Optimise one free embedding per image (27 classes x 8 images) under an objective:
    no architecture, no data, only what the objective asks for. The CPCC it ends with."""
    gen = torch.Generator().manual_seed(seed)
    leaves = torch.arange(27).repeat(8)
    labels = torch.as_tensor(HIERARCHY.labels_from_leaves(leaves.numpy()))
    emb = torch.randn(len(leaves), 16, generator=gen).requires_grad_()
    heads = [torch.nn.Linear(16, HIERARCHY.n_classes(lv)) for lv in range(3)]
    params = [emb, *(p for h in heads for p in h.parameters())]
    opt = torch.optim.Adam(params, lr=0.05)
    loss_fn = make_objective(objective, HIERARCHY, cpcc_weight=1.0)
    for _ in range(150):
        loss, _ = loss_fn(emb, [h(emb) for h in heads], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    leaf_acc = float((heads[-1](emb).argmax(1) == leaves).float().mean())
    assert leaf_acc == 1.0  # both objectives separate the leaves
    return cpcc(emb.detach(), labels, HIERARCHY)


def test_hier_objective_puts_classes_at_tree_distances_flat_does_not():
    """Known effect: with free embeddings, flat cross-entropy separates the leaves in any
    geometry (CPCC stays near the random start's ~0), the hierarchical objective lays the
    class means out along the tree (CPCC near 1). Measured: hier 0.995, 0.994; flat -0.02, -0.00."""
    for seed in (0, 1):
        hier, flat = _fit_free_embeddings("hier", seed), _fit_free_embeddings("flat", seed)
        assert hier > 0.9
        assert flat < 0.5
        assert hier - flat > 0.5


def test_flat_objective_ignores_the_coarse_heads():
    loss_fn = make_objective("flat", HIERARCHY, cpcc_weight=1.0)
    emb = torch.randn(6, 4)
    logits = [torch.randn(6, HIERARCHY.n_classes(lv), requires_grad=True) for lv in range(3)]
    labels = torch.as_tensor(HIERARCHY.labels_from_leaves([0, 5, 9, 13, 20, 26]))
    loss, _ = loss_fn(emb, logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits[-1], labels[:, -1]))
    with pytest.raises(HsaeError, match="flat, hier"):
        make_objective("cpcc", HIERARCHY, 1.0)


# ---- store -----------------------------------------------------------------------------


def test_trained_once_then_reused(count_training, hsae_home):
    path = ensure_stand_in("vit", "hier", 0, TINY)
    assert path.parent == hsae_home / "stand_ins" and path.name.startswith("vit-hier-s0-")
    assert {p.name for p in path.iterdir()} == {
        "model.safetensors",
        "train_config.json",
        "metrics.json",
    }
    metrics = json.loads((path / "metrics.json").read_text())
    for key in ("acc@family", "acc@genus", "acc@species", "cpcc", "cpcc@layer1", "train_seconds"):
        assert key in metrics, key
    config = json.loads((path / "train_config.json").read_text())
    assert config["key"]["recipe"]["steps"] == TINY["steps"]
    assert ensure_stand_in("vit", "hier", 0, Recipe.from_dict(TINY)) == path
    _backbone("hier")  # the adapter reuses it too
    assert len(count_training) == 1
    # A changed recipe, seed or objective is another stand-in, in another folder.
    other = ensure_stand_in("vit", "hier", 0, {**TINY, "steps": 4})
    assert other != path and len(count_training) == 2
    assert ensure_stand_in("vit", "flat", 0, TINY) not in (path, other)
    assert len(list((hsae_home / "stand_ins").glob("vit-*"))) == 3
    leftovers = [p for p in (hsae_home / "stand_ins").glob(".*") if p.is_dir()]
    assert not leftovers, "temporary folders left behind"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "metrics.json").unlink(), "missing"),
        (lambda p: (p / "metrics.json").write_text("{not json"), "damaged"),
        (lambda p: (p / "model.safetensors").write_bytes(b"\0" * 64), "checksum"),
        (
            lambda p: (p / "train_config.json").write_text(
                (p / "train_config.json").read_text().replace('"steps": 3', '"steps": 30')
            ),
            "stale",
        ),
    ],
)
def test_damaged_entry_fails_clearly(damage, message, count_training):
    path = ensure_stand_in("vit", "flat", 1, TINY)
    damage(path)
    with pytest.raises(HsaeError, match=message) as err:
        ensure_stand_in("vit", "flat", 1, TINY)
    assert str(path) in str(err.value) and "delete" in str(err.value)
    assert len(count_training) == 1  # never silently retrained or reused


def test_recipe_overrides_are_checked():
    with pytest.raises(HsaeError, match=r"unknown fields.*stpes"):
        Recipe.from_dict({"stpes": 3})
    with pytest.raises(HsaeError, match="steps=0"):
        Recipe.from_dict({"steps": 0})
    with pytest.raises(HsaeError, match="not a stand-in architecture"):
        ensure_stand_in("resnet", "flat", 0, TINY)
    with pytest.raises(HsaeError, match="not a stand-in objective"):
        ensure_stand_in("vit", "imagenet", 0, TINY)


# ---- adapter ---------------------------------------------------------------------------


def test_adapter_contract():
    backbone = _backbone("hier", seed=0)
    layers = backbone.layers()
    assert [info.name for info in layers] == ["encoder.blocks.0", "encoder.blocks.1"]
    assert {(info.n_tokens, info.d_model) for info in layers} == {(1 + 4 * 4, 16)}
    assert backbone.has_cls and backbone.n_prefix_tokens == 1
    images = torch.rand(5, 3, 32, 32)
    captured = backbone.capture(backbone.normalize(images), [0, 1])
    assert {k: tuple(v.shape) for k, v in captured.items()} == {0: (5, 17, 16), 1: (5, 17, 16)}
    rows, token_index = backbone.select(captured[1], "cls")
    assert rows.shape == (5, 16) and token_index.tolist() == [0]
    assert backbone.forward_edited(backbone.normalize(images), 1, None).shape == (5, 16)
    # 64 px images are resized to the 32 px the stand-in was trained at.
    assert backbone.preprocess(torch.rand(3, 64, 64)).shape == (3, 32, 32)
    _, config, metrics = load_stand_in(backbone.store_path)
    assert config["key"]["objective"] == "hier" and 0 <= metrics["acc@species"] <= 1


def test_fingerprint_differs_between_seeds_and_objectives():
    fp = _backbone("hier", seed=0).fingerprint()
    assert _backbone("hier", seed=0).fingerprint() == fp
    assert _backbone("hier", seed=1).fingerprint() != fp
    assert _backbone("flat", seed=0).fingerprint() != fp


def test_configs_compose(compose):
    from hsae.config import RunConfig, to_objects

    for name, objective in (("stand_in_flat", "flat"), ("stand_in_hier", "hier")):
        cfg = compose([f"backbone={name}", "dataset=synthetic_tree", "+backbone.recipe.steps=7"])
        run = to_objects(cfg, RunConfig)
        assert run.backbone.loader == "stand_in" and run.backbone.pretrained == objective
        assert run.backbone.recipe == {"steps": 7} and run.dataset.name == "synthetic_tree"


@pytest.mark.slow
def test_step1_on_a_stand_in_from_the_command_line(tmp_path, hsae_home):
    """``evaluate.py backbone=stand_in_hier layer=1 dataset=synthetic_tree`` trains the
    missing stand-in, then measures it."""
    recipe = json.dumps(TINY).replace('"', "")
    command = [
        sys.executable, str(ROOT / "evaluate.py"), "backbone=stand_in_hier", "layer=1",
        "dataset=synthetic_tree", "dataset.n_val=200", f"++backbone.recipe={recipe}",
        "backbone.d_model=16", f"cache.dir={tmp_path / 'cache'}", f"out_dir={tmp_path / 'hier'}",
    ]  # fmt: skip
    env = {**os.environ, "HSAE_HOME": str(hsae_home)}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not in the store: training it" in result.stderr + result.stdout
    (path,) = (tmp_path / "hier").glob("stand_in_hier_l1_cls_synthetic_tree-val.json")
    metrics = json.loads(path.read_text())["metrics"]
    assert -1 <= metrics["hier/cpcc"] <= 1 and "hier/probe_acc@genus" in metrics
    assert len(list((hsae_home / "stand_ins").glob("vit-hier-s0-*"))) == 1
