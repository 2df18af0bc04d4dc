"""What a training run leaves behind is what it trained, and means what it claims (issue #11):

- ``sae.safetensors`` equals ``checkpoints/last.ckpt`` for every architecture (nothing after
  ``fit`` runs the SAE in training mode: no val row moves a trained buffer);
- BatchTopK / Matryoshka's inference threshold gives an eval L0 of ``k``;
- the dead-latent window scales with the run, so AuxK can switch on in a short run;
- the W&B top-image grids hold the images, in 0..255.

Two tiny in-process runs (smoke sizes, W&B offline) serve every test: a bank of the whole
zoo (each member's files and W&B run written after training, by ``hsae.training.run``) and
a single Matryoshka run (its latent report written by the ``LatentReport`` callback).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hsae.sae import SAE_REGISTRY, make_sae
from tests.wandb_offline import records

ARCHS = sorted(SAE_REGISTRY)
ZOO_BANK = "bank=[" + ",".join(f"{{arch:{arch}}}" for arch in ARCHS) + "]"
K = 16  # the job's sae.k (conf/sae/topk.yaml), inherited by every member


@pytest.fixture(scope="module")
def train_job(compose, tmp_path_factory):
    from hsae.training.run import train

    cache_dir = tmp_path_factory.mktemp("cache")

    def _train(run_dir: Path, *overrides: str):
        cfg = compose(
            ["experiment=smoke", "logger=wandb", "logger.mode=offline", f"cache.dir={cache_dir}",
             *overrides]
        )  # fmt: skip
        return train(cfg, run_dir)

    return _train


@pytest.fixture(scope="module")
def zoo_bank(train_job, tmp_path_factory):
    job_dir = tmp_path_factory.mktemp("zoo") / "job"
    train_job(job_dir, ZOO_BANK)
    listing = json.loads((job_dir / "bank.json").read_text())["members"]
    members = {m["entry"]["arch"]: (m["index"], job_dir / m["dir"]) for m in listing}
    assert sorted(members) == ARCHS
    return job_dir, members


@pytest.fixture(scope="module")
def single_run(train_job, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    train_job(run_dir, "sae=matryoshka")
    return run_dir


def checkpoint_sae_state(ckpt_path: Path, index: int, member_dir: Path) -> dict[str, torch.Tensor]:
    """Member ``index``'s SAE as the checkpoint holds it, folded as ``save_sae`` folds."""
    config = json.loads((member_dir / "cfg.json").read_text())["sae"]
    config.pop("lr")
    sae = make_sae(**config)
    state = torch.load(ckpt_path, weights_only=False)["state_dict"]
    prefix = f"saes.{index}."
    sae.load_state_dict(
        {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    )
    return sae.folded_state_dict()


def assert_saved_equals_checkpoint(saved_dir: Path, ckpt_path: Path, index: int) -> None:
    saved = load_file(saved_dir / "sae.safetensors")
    expected = checkpoint_sae_state(ckpt_path, index, saved_dir)
    assert saved.keys() == expected.keys()
    for key in saved:
        assert torch.equal(saved[key], expected[key]), (
            f"{key}: saved {saved[key].flatten()[:4]} vs checkpoint {expected[key].flatten()[:4]}"
        )


# ---- item 7: the saved SAE is the trained one ---------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_weights_equal_the_last_checkpoint_bank_member(zoo_bank, arch):
    job_dir, members = zoo_bank
    index, member_dir = members[arch]
    assert_saved_equals_checkpoint(member_dir, job_dir / "checkpoints" / "last.ckpt", index)


def test_saved_weights_equal_the_last_checkpoint_single_run(single_run):
    assert_saved_equals_checkpoint(single_run, single_run / "checkpoints" / "last.ckpt", 0)


# ---- item 8: inference L0 matches k -------------------------------------------------------


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_threshold_archs_end_with_eval_l0_at_k(zoo_bank, arch):
    _, members = zoo_bank
    metrics = json.loads((members[arch][1] / "metrics.json").read_text())
    assert metrics["l0_target"] == K
    # Measured (this bank's config, CSV logger): batchtopk 15.40, matryoshka 15.33 on the
    # val rows (16.00 on the calibration rows, by construction); before calibration, with
    # the running average alone: 3.18 and 3.42.
    assert abs(metrics["l0"] - K) <= 0.1 * K, metrics["l0"]


def test_topk_reports_its_target_and_non_k_archs_do_not(zoo_bank):
    _, members = zoo_bank
    topk = json.loads((members["topk"][1] / "metrics.json").read_text())
    assert topk["l0"] == pytest.approx(K) and topk["l0_target"] == K
    relu = json.loads((members["relu"][1] / "metrics.json").read_text())
    assert "l0_target" not in relu


# ---- item 9: the dead-latent window scales with the run ------------------------------------


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "hierarchical"])
def test_dead_window_is_a_fraction_of_the_epoch(zoo_bank, arch):
    from hsae.config import SAEConfig

    _, members = zoo_bank
    sae_cfg = json.loads((members[arch][1] / "cfg.json").read_text())["sae"]
    rows_per_epoch, epochs = 512, 2  # experiment=smoke: 512 rows, batch 128, 2 epochs
    fraction = SAEConfig.dead_epoch_fraction
    assert sae_cfg["dead_tokens_threshold"] == round(fraction * rows_per_epoch)
    assert sae_cfg["dead_tokens_threshold"] < rows_per_epoch * epochs  # AuxK can switch on


# ---- item 11: the W&B grids are the images ------------------------------------------------


def logged_grids(run_dir: Path) -> dict[int, Path]:
    """``{latent: grid PNG}`` of the ``latents/top_images`` the offline run logged."""
    (offline,) = run_dir.glob("wandb/offline-run-*")
    (run_file,) = offline.glob("run-*.wandb")
    media: dict[str, object] = {}  # the media's fields arrive as nested keys
    for record in records(run_file):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                if list(item.nested_key[:1]) == ["latents/top_images"]:
                    media[item.nested_key[1]] = json.loads(item.value_json)
    assert media.get("_type") == "images/separated", f"no latents/top_images in {run_file}"
    latents = [int(c.removeprefix("latent ")) for c in media["captions"]]  # type: ignore[union-attr]
    paths = [offline / "files" / name for name in media["filenames"]]  # type: ignore[union-attr]
    return dict(zip(latents, paths, strict=True))


def test_top_image_grids_hold_the_source_images(single_run):
    from hsae.cache import ActivationCache
    from hsae.config import DatasetConfig
    from hsae.data import make_dataset
    from hsae.sae import load_sae
    from hsae.training.latents import collect_latent_stats

    run_cfg = json.loads((single_run / "cfg.json").read_text())
    val = make_dataset(DatasetConfig(**run_cfg["dataset"]), "val")
    val.transform = None
    stats = collect_latent_stats(
        load_sae(single_run).eval(), ActivationCache.open(run_cfg["cache"]["val"]), top_n=9
    )
    grids = logged_grids(single_run)
    assert len(grids) == 8
    tile, pad = 64, 1  # 64-pixel tiles, 3 per row, 1-pixel padding
    for latent, path in grids.items():
        grid = np.asarray(Image.open(path).convert("RGB")).astype(float)
        assert grid.shape == (3 * (tile + pad) + pad,) * 2 + (3,)
        assert grid.max() > 100, f"{path.name}: pixel values up to {grid.max()} of 255"
        for j, image_id in enumerate(stats.top_images_kt[latent].tolist()):
            if image_id < 0:
                continue
            r, c = divmod(j, 3)
            y, x = pad + r * (tile + pad), pad + c * (tile + pad)
            source = val[image_id][0].permute(1, 2, 0).numpy() * 255  # [0, 1] CHW
            # Exact but for rounding to 8 bits.
            assert np.abs(grid[y : y + tile, x : x + tile] - source).max() <= 1, (latent, j)
