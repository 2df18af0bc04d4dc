"""Automatic latent names in a text tower's joint space: the ridge map from a layer to the
image embedding (its held-out R^2 separates a linear relation from none), names that agree
with the latents' majority classes when decoder directions carry their class's text
embedding (and about chance for random directions), and evaluate.py writing the names."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from hsae.data.synthetic import HIERARCHY
from hsae.errors import HsaeError
from hsae.metrics.interp import fit_joint_map, name_report, top_class
from tests.conftest import ROOT

N_IMAGES, D, E = 1080, 48, 32
COPIES = 3  # latents per class, so the agreement of random directions averages over many


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world():
    """Images of the synthetic hierarchy, layer features ``x`` and joint-space embeddings
    ``y = x A + noise`` (plus an offset), hierarchical class text embeddings (a child's is
    its parent's plus its own part), and ``COPIES`` latents per class of every level, each
    firing on its class's images."""
    gen = torch.Generator().manual_seed(0)
    leaves = torch.arange(N_IMAGES) % HIERARCHY.n_leaves
    labels = torch.as_tensor(HIERARCHY.labels_from_leaves(leaves.numpy()))
    map_true = torch.randn(D, E, generator=gen) / D**0.5
    feats = torch.randn(N_IMAGES, D, generator=gen)
    emb = feats @ map_true + 0.05 * torch.randn(N_IMAGES, E, generator=gen) + 2.0
    text = [torch.randn(3, E, generator=gen)]
    for level in (1, 2):
        parents = torch.as_tensor(HIERARCHY.parents[level])
        text.append(text[-1][parents] + 0.7 * torch.randn(len(parents), E, generator=gen))
    classes = [(lv, c) for lv in range(3) for c in range(HIERARCHY.n_classes(lv))] * COPIES
    acts = torch.stack([
        (labels[:, lv] == c).float() * (1 + 0.5 * torch.rand(N_IMAGES, generator=gen))
        for lv, c in classes
    ], dim=1)  # fmt: skip
    return {
        "labels": labels, "feats": feats, "emb": emb, "map_true": map_true, "text": text,
        "classes": classes, "acts": acts, "gen": gen,
    }  # fmt: skip


def test_map_r2_separates_a_linear_relation_from_none(world):
    joint = fit_joint_map(world["feats"], world["emb"])
    assert joint.r2 > 0.95
    torch.testing.assert_close(joint.map_de, world["map_true"], atol=0.02, rtol=0)
    gen = torch.Generator().manual_seed(1)
    unrelated = fit_joint_map(world["feats"], torch.randn(N_IMAGES, E, generator=gen))
    assert unrelated.r2 < 0.05
    assert unrelated.ridge > joint.ridge  # GCV shrinks a map that predicts nothing


def test_planted_names_agree_and_random_ones_do_not(world):
    joint = fit_joint_map(world["feats"], world["emb"])
    # Planted: a direction the (true) map carries to the text embedding of the latent's class.
    right_inverse = torch.linalg.pinv(world["map_true"])  # [E, D]
    planted = torch.stack([world["text"][lv][c] for lv, c in world["classes"]]) @ right_inverse
    random = torch.randn(planted.shape, generator=world["gen"])
    args = (world["acts"], world["labels"], HIERARCHY, world["text"])
    high = name_report(planted, joint.map_de, *args)
    low = name_report(random, joint.map_de, *args)
    for level, name in enumerate(HIERARCHY.level_names):
        chance = 1 / HIERARCHY.n_classes(level)
        assert high.metrics[f"interp/name_agreement@{name}"] > 0.9, name
        assert low.metrics[f"interp/name_agreement@{name}"] < chance + 0.15, name
        assert high.metrics[f"interp/majority_latents@{name}"] >= 0.9 * COPIES * sum(
            HIERARCHY.n_classes(lv) for lv in range(level, HIERARCHY.n_levels)
        )  # every latent of this level or a finer one has a clear majority here
    assert high.metrics["interp/name_score"] > 0.8
    assert low.metrics["interp/name_score"] < high.metrics["interp/name_score"] - 0.3
    # The default vocabulary is every class name: a planted latent is named by its class.
    own = [HIERARCHY.class_names[lv][c] for lv, c in world["classes"]]
    name_col = high.columns.index("name")
    assert sum(row[name_col] == own[row[0]] for row in high.rows) >= 0.9 * len(own)


def test_name_report_table_and_user_vocabulary(world):
    joint = fit_joint_map(world["feats"], world["emb"])
    right_inverse = torch.linalg.pinv(world["map_true"])
    planted = torch.stack([world["text"][lv][c] for lv, c in world["classes"]]) @ right_inverse
    vocab = [f"word{i}" for i in range(27)]
    vocab_text = world["text"][2].flip(0)  # word0 is the last variant's text
    acts = world["acts"].clone()
    acts[:, 0] = 0  # a latent that never fires has no row
    report = name_report(
        planted, joint.map_de, acts, world["labels"], HIERARCHY, world["text"], vocab, vocab_text
    )
    assert report.columns[:4] == ["latent", "n_images", "name", "name_score"]
    assert [c for c in report.columns if c.startswith("top_class@")] == [
        f"top_class@{n}" for n in HIERARCHY.level_names
    ]
    assert [row[0] for row in report.rows] == list(range(1, acts.shape[1]))
    assert all(len(row) == len(report.columns) for row in report.rows)
    names = {row[2] for row in report.rows}
    assert names <= set(vocab)
    last_variant = world["classes"].index((2, 26))
    assert report.rows[last_variant - 1][2] == "word0"
    json.dumps(report.rows)  # eval.json and the W&B table take it as it is
    with pytest.raises(HsaeError, match="together"):
        name_report(planted, joint.map_de, acts, world["labels"], HIERARCHY, world["text"], vocab)
    with pytest.raises(HsaeError, match="one decoder row per latent"):
        name_report(planted[1:], joint.map_de, acts, world["labels"], HIERARCHY, world["text"])


def test_top_class_matches_the_reference_loop():
    """What control_metrics computed inline before ``top_class``."""
    gen = torch.Generator().manual_seed(4)
    acts = torch.relu(torch.randn(200, 70, generator=gen) - 1.0)
    labels = torch.randint(0, 9, (200,), generator=gen)
    top = acts.topk(20, dim=0)
    fired = top.values > 0
    top_labels = labels[top.indices]
    counts = torch.stack([((top_labels == c) & fired).sum(dim=0) for c in range(9)])
    ours = top_class(acts, labels, 9, n_top=20, chunk=16)
    torch.testing.assert_close(ours.purity_k, counts.max(dim=0).values / fired.sum(0).clamp_min(1))
    torch.testing.assert_close(ours.class_k, counts.argmax(dim=0))
    torch.testing.assert_close(ours.n_fired_k, fired.sum(dim=0))


def test_map_needs_held_out_images():
    with pytest.raises(HsaeError, match="held-out"):
        fit_joint_map(torch.randn(6, 4), torch.randn(6, 3))
    with pytest.raises(HsaeError, match="same images"):
        fit_joint_map(torch.randn(20, 4), torch.randn(19, 3))


# --- evaluate.py ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("names")
    run_dir = tmp / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=smoke", "logger=csv",
         f"hydra.run.dir={run_dir}", f"cache.dir={tmp / 'cache'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_evaluate_writes_names_into_eval_json(tiny_run):
    result = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), f"run_dir={tiny_run}", "control=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tiny_run / "eval.json").read_text())
    metrics, table = record["metrics"], record["latents"]
    # The values themselves: test_name_score_separates_planted_from_random_decoders.
    assert math.isfinite(metrics["interp/names_map_r2"])
    assert math.isfinite(metrics["interp/name_score"])
    for level in HIERARCHY.level_names:
        assert metrics[f"interp/majority_latents@{level}"] >= 0
        assert f"interp/name_agreement@{level}" in metrics
    assert not any(key.startswith("interp/name") for key in record["skipped"])
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["rows"]]
    assert rows and all(row["n_images"] > 0 for row in rows)
    every_class = {name for names in HIERARCHY.class_names for name in names}
    assert {row["name"] for row in rows} <= every_class
    assert {row["name@family"] for row in rows} <= set(HIERARCHY.class_names[0])
    assert {row["top_class@variant"] for row in rows} <= set(HIERARCHY.class_names[2])


def test_name_score_separates_planted_from_random_decoders(tiny_run, monkeypatch):
    """The names of a real run (tiny_vit: a text tower, random weights), through
    ``automatic_names`` as evaluate.py calls it. Decoder rows that the run's own joint-space
    map carries onto vocabulary entries (a perfect SAE for naming) score a name cosine near
    1 and are named by those entries; random rows (a null SAE) score far lower."""
    from hsae import evaluation
    from hsae.cache import ActivationCache
    from hsae.evaluation import naming
    from hsae.metrics import interp
    from hsae.sae import load_sae

    cfg = evaluation.read_run_cfg(tiny_run)
    sae = load_sae(tiny_run).eval()
    cache = ActivationCache.open(cfg["cache"]["val"])
    images = evaluation.image_pass(sae, cache, 4096, torch.device("cpu"))
    backbone = evaluation.make_run_backbone(cfg, "cpu")
    maps = []
    fit = interp.fit_joint_map
    monkeypatch.setattr(
        interp, "fit_joint_map", lambda *a, **k: maps.append(fit(*a, **k)) or maps[-1]
    )
    vocab = [name for names in HIERARCHY.class_names for name in dict.fromkeys(names)]
    vocab = list(dict.fromkeys(vocab))  # the default vocabulary: every class name once
    text = interp.centred_text(naming._encode_text(backbone, [f"a photo of a {v}." for v in vocab]))
    gen = torch.Generator().manual_seed(0)
    scores, named = {}, {}
    for kind in ("random", "planted"):
        with torch.no_grad():
            if kind == "random":
                sae.W_dec.copy_(torch.randn(sae.W_dec.shape, generator=gen))
            else:  # row j: the map's least-squares preimage of entry j % V
                target = text[torch.arange(sae.n_latents) % len(vocab)]
                sae.W_dec.copy_(target @ torch.linalg.pinv(maps[-1].map_de))
        metrics, table = evaluation.automatic_names(sae, cache, images, cfg, "val", backbone)
        scores[kind] = metrics["interp/name_score"]
        rows = [dict(zip(table["columns"], row, strict=True)) for row in table["rows"]]
        named[kind] = sum(r["name"] == vocab[r["latent"] % len(vocab)] for r in rows) / len(rows)
    assert scores["planted"] > 0.95  # measured 1.000 (map R^2 0.99)
    assert scores["random"] < scores["planted"] - 0.4  # measured 0.235
    assert named["planted"] > 0.95 and named["random"] < 0.2


def _quick(monkeypatch, media=None):
    """evaluate_run without the other step-3 metrics (their cost is theirs)."""
    from hsae.evaluation import step3 as evaluation

    monkeypatch.setattr(evaluation, "interpretability", lambda *a, **k: ({}, {}))
    if media is not None:
        monkeypatch.setattr(
            evaluation, "_log_eval_to_wandb", lambda *a: media.append(a[3] if len(a) > 3 else None)
        )
    return evaluation


def test_user_vocabulary_names_and_the_wandb_table(tiny_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("eval*"))
    vocab_path = tmp_path / "vocab.txt"
    vocab_path.write_text("a photo of a dog.\n\nstripes\n  a red thing \n")
    media: list = []
    evaluation = _quick(monkeypatch, media)
    metrics = evaluation.evaluate_run(run_dir, device="cpu", control=False, names_vocab=vocab_path)
    assert "interp/name_score" in metrics
    table = json.loads((run_dir / "eval.json").read_text())["latents"]
    names = {row[table["columns"].index("name")] for row in table["rows"]}
    assert names <= {"a photo of a dog.", "stripes", "a red thing"}
    assert media == [{"latents/names": table}]
    with pytest.raises(HsaeError, match="names_vocab"):
        evaluation.evaluate_run(run_dir, device="cpu", names_vocab=tmp_path / "missing.txt")


def test_names_are_skipped_with_a_reason(tiny_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("eval*"))
    evaluation = _quick(monkeypatch)

    def skipped() -> dict:
        record = json.loads((run_dir / "eval.json").read_text())
        assert "latents" not in record
        # Undefined is not zero: every name metric is present as NaN (null in the JSON),
        # and the reason is under skipped.
        names = {k: v for k, v in record["metrics"].items() if k.startswith("interp/name")}
        assert names and all(v is None or math.isnan(v) for v in names.values()), names
        return record["skipped"]

    # A backbone without a text tower (say a timm ViT).
    monkeypatch.setattr(
        evaluation, "make_run_backbone", lambda *a: types.SimpleNamespace(name="vit_tiny")
    )
    evaluation.evaluate_run(run_dir, device="cpu", control=False)
    assert "no text tower" in skipped()["interp/name*"]
    evaluation.evaluate_run(run_dir, device="cpu", control=False, names=False)
    assert skipped()["interp/name*"] == "names=false"
    # A run trained on an activations file has no backbone to ask.
    cfg = json.loads((run_dir / "cfg.json").read_text())
    cfg["dataset"]["name"] = "activations"
    (run_dir / "cfg.json").write_text(json.dumps(cfg))
    evaluation.evaluate_run(run_dir, device="cpu")
    assert "activations file" in skipped()["interp/name*"]


def test_centred_text_removes_the_shared_part():
    from hsae.metrics.interp import centred_text

    gen = torch.Generator().manual_seed(5)
    shared = 5 * torch.randn(1, E, generator=gen)
    text = shared + torch.randn(6, E, generator=gen)
    centred = centred_text(text)
    torch.testing.assert_close(centred.sum(dim=0), torch.zeros(E), atol=1e-5, rtol=0)
    assert (F.cosine_similarity(centred, F.normalize(shared, dim=1)).abs() < 0.5).all()
