"""Shared fixtures: offline environment, Hydra compose of the real configs, tiny runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports huggingface_hub or wandb: no hub look-ups (they hang ~50 s
# offline), no W&B network, nothing written to the home folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# Real photos for tests (../shared/data, beside the checkout, as in CI).
HIERARCAPS_IMAGES = ROOT.parent / "shared" / "data" / "hierarcaps" / "images"


def require_hierarcaps() -> Path:
    """The HierarCaps photos; a missing copy fails the test (a skip would check nothing)."""
    if not HIERARCAPS_IMAGES.is_dir():
        pytest.fail(
            f"no HierarCaps images at {HIERARCAPS_IMAGES}: the tests read the shared test data "
            "in ../shared/data beside this checkout; clone the project next to it"
        )
    return HIERARCAPS_IMAGES


# A run of a few seconds: 512 train / 256 val images, 2 epochs, CSV logs.
TINY = ["experiment=smoke", "logger=csv"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is fastest, and on a shared machine several threads per
    process spend their time waiting for each other (5x slower under load). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def hierarcaps() -> Path:
    return require_hierarcaps()


@pytest.fixture(scope="session")
def compose():
    """``compose(overrides, config_name="train")`` -> the composed DictConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hsae.config import register_configs

    register_configs()

    def _compose(overrides=(), config_name="train"):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))

    return _compose


@pytest.fixture(scope="session")
def tiny_backbone():
    from hsae.backbones import make_backbone
    from hsae.config import BackboneConfig

    return make_backbone(
        BackboneConfig(name="tiny_vit", model_name="hsae-tiny-vit", d_model=128, layer=2)
    )


def perfect_and_null_sae(d: int):
    """A TopK SAE that reconstructs any input exactly (``relu(x) - relu(-x) = x``) and one
    that reconstructs nothing: the two ends of every splice-in fidelity metric."""
    import torch

    from hsae.sae import TopKSAE

    perfect = TopKSAE(d_model=d, n_latents=2 * d, k=2 * d).eval()
    with torch.no_grad():
        perfect.W_dec.copy_(torch.cat([torch.eye(d), -torch.eye(d)]))
        perfect.W_enc.copy_(perfect.W_dec.T)
    null = TopKSAE(d_model=d, n_latents=8, k=1).eval()
    with torch.no_grad():
        null.W_dec.zero_()
    return perfect, null
