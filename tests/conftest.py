"""Shared fixtures: offline environment, the test sandbox (no test reads beside the clone),
Hydra compose of the real configs, tiny runs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.sandbox import hsae_test_sandbox

# Before anything imports huggingface_hub or wandb: no hub look-ups (they hang ~50 s
# offline), no W&B network, nothing written to the home folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# The full HierarCaps set of a development machine is for benchmarks (bench/hierarcaps.py);
# a test that reached it through the dataset config's default would pass only there.
os.environ.pop("HSAE_HIERARCAPS_DIR", None)

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# Real photos for tests, checked into the repo: 32 of the 1,000 HierarCaps test photos with
# their caption chains (source, licences and how they were chosen: tests/data/README.md).
HIERARCAPS_DIR = ROOT / "tests" / "data" / "hierarcaps"
HIERARCAPS_IMAGES = HIERARCAPS_DIR / "images"
HIERARCAPS_CSV = HIERARCAPS_DIR / "hierarcaps_test.csv"
HIERARCAPS_ROWS = 32
# The WordNet 3.0 noun entries scripts/make_imagenet_hierarchy.py reads (tests/data/README.md).
WORDNET_DIR = ROOT / "tests" / "data" / "wordnet"


# ---- the sandbox: no test reads beside the clone ---------------------------------------
#
# HSAE_TEST_SANDBOX=1 (.ci/run) requires it, =0 turns it off; unset, it is on wherever the
# layout allows (not for a clone directly in the temp folder). See tests/sandbox/.

SANDBOX_DIR = ROOT / "tests" / "sandbox"
SANDBOX_MODE = os.environ.get("HSAE_TEST_SANDBOX", "")
SANDBOX = hsae_test_sandbox.installed()
SANDBOX_OFF_REASON = "HSAE_TEST_SANDBOX=0"
if SANDBOX is None and SANDBOX_MODE != "0":
    try:
        _fd, _log = tempfile.mkstemp(prefix="hsae-sandbox-", suffix=".log")
        os.close(_fd)
        SANDBOX = hsae_test_sandbox.Sandbox(ROOT, _log).install()
    except hsae_test_sandbox.SandboxError as e:
        if SANDBOX_MODE == "1":
            raise
        SANDBOX_OFF_REASON = str(e)
    else:
        # Every Python subprocess a test starts installs the same hook (sitecustomize.py).
        os.environ[hsae_test_sandbox.ENV_CLONE] = str(ROOT)
        os.environ[hsae_test_sandbox.ENV_LOG] = _log
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(SANDBOX_DIR), os.environ.get("PYTHONPATH")) if p
        )


def _sandbox_violations() -> list[str]:
    """Reads refused since the last call, in this process and in subprocesses (all of
    them append to the log)."""
    if SANDBOX is None:
        return []
    with open(SANDBOX.log, "r+", encoding="utf-8") as f:
        found = f.read().splitlines()
        f.truncate(0)
    return found


_OUTSIDE_TESTS: list[str] = []  # refused during collection: reported when the session ends


def pytest_collection_finish(session):
    _OUTSIDE_TESTS.extend(_sandbox_violations())


@pytest.fixture(autouse=True)
def _no_reads_beside_the_clone():
    """Fails the test that read beside the clone (its module fixtures' reads included)."""
    yield
    found = _sandbox_violations()
    if found:
        pytest.fail(
            f"the test read {len(found)} path(s) outside the clone {ROOT} (a fresh clone has "
            "nothing beside it; use tests/data/ or build the input in the test):\n  "
            + "\n  ".join(found[:20])
        )


def pytest_report_header(config):
    if SANDBOX is None:
        return f"hsae sandbox: off ({SANDBOX_OFF_REASON})"
    return f"hsae sandbox: reads outside {ROOT} (beside it in {SANDBOX.parent}) fail the test"


def pytest_sessionfinish(session, exitstatus):
    if SANDBOX is None:
        return
    found = _OUTSIDE_TESTS + _sandbox_violations()
    if found:  # outside any test: collection, or after the last test
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nhsae sandbox: read outside the clone outside any test:\n  " + "\n  ".join(found))
    Path(SANDBOX.log).unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter):
    if SANDBOX is not None:
        terminalreporter.write_line(
            f"hsae sandbox: {SANDBOX.n_checked} reads checked in the pytest process, more in "
            f"its Python subprocesses; none outside {ROOT} unless reported above"
        )


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
