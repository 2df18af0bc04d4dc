"""The test sandbox (tests/sandbox/): a read beside the clone is refused and recorded, in
this process and in Python subprocesses; reads inside the clone and of the environment pass.
Checked on a fake layout ``<tmp>/work/{hsae,shared}``, then live on this session's clone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import conftest
from tests.conftest import ROOT, SANDBOX_DIR
from tests.sandbox.hsae_test_sandbox import ENV_CLONE, ENV_LOG, Sandbox, SandboxError


@pytest.fixture
def layout(tmp_path):
    """``work/hsae`` (the clone, with a symlink out of it) beside ``work/shared``."""
    work = tmp_path / "work"
    (work / "hsae" / "tests").mkdir(parents=True)
    (work / "hsae" / "tests" / "ok.csv").write_text("a\n")
    (work / "shared" / "data").mkdir(parents=True)
    (work / "shared" / "data" / "x.csv").write_text("a\n")
    (work / "hsae" / "tests" / "link").symlink_to(work / "shared" / "data")
    return work


def test_refuses_siblings_and_allows_the_clone(layout, monkeypatch):
    sandbox = Sandbox(layout / "hsae")
    clone, shared = layout / "hsae", layout / "shared"
    assert not sandbox.forbidden(clone / "tests" / "ok.csv")
    assert not sandbox.forbidden(layout)  # listing the parent names siblings, reads none
    assert not sandbox.forbidden(Path(sys.prefix) / "lib")  # the environment
    assert sandbox.forbidden(shared / "data" / "x.csv")
    assert sandbox.forbidden(shared / "absent.csv")  # refused before the file system says no
    assert sandbox.forbidden(clone / "tests" / "link" / "x.csv")  # a symlink out of the clone
    monkeypatch.chdir(clone)
    assert sandbox.forbidden("../shared/data/x.csv") and not sandbox.forbidden("tests/ok.csv")


def test_home_settings_and_cache_variables_are_environment(layout, monkeypatch):
    # A clone in the home folder: ~/.cache and ~/.netrc are settings, ~/shared is a sibling.
    monkeypatch.setenv("HOME", str(layout))
    monkeypatch.setenv("HF_HOME", str(layout / "hf"))
    sandbox = Sandbox(layout / "hsae")
    assert not sandbox.forbidden(layout / ".cache" / "torch" / "x.pt")
    assert not sandbox.forbidden(layout / ".netrc")
    assert not sandbox.forbidden(layout / "hf" / "hub" / "model.safetensors")
    assert sandbox.forbidden(layout / "shared" / "data" / "x.csv")


def test_the_hook_raises_and_records(layout):
    sandbox = Sandbox(layout / "hsae", layout / "refused.log")
    inside = str(layout / "hsae" / "tests" / "ok.csv")
    outside = str(layout / "shared" / "data" / "x.csv")
    sandbox.hook("open", (inside, "r", 0))
    sandbox.hook("os.listdir", (str(layout),))
    sandbox.hook("open", (3, "r", 0))  # a file descriptor: checked when it was opened
    sandbox.hook("exec", (outside,))  # not a read
    assert sandbox.violations == [] and sandbox.n_checked == 2
    with pytest.raises(PermissionError, match="outside the clone"):
        sandbox.hook("open", (outside, "r", 0))
    with pytest.raises(PermissionError):
        sandbox.hook("os.scandir", (str(layout / "shared"),))
    assert sandbox.violations == [f"open {outside}", f"os.scandir {layout / 'shared'}"]
    assert (layout / "refused.log").read_text().count("\n") == 2


def test_a_clone_directly_in_the_temp_folder_cannot_be_checked():
    import tempfile

    with pytest.raises(SandboxError, match="temp folder"):
        Sandbox(Path(tempfile.gettempdir()) / "hsae")


def child(layout: Path, code: str, extra_path: str = "") -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        ENV_CLONE: str(layout / "hsae"),
        ENV_LOG: str(layout / "refused.log"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(SANDBOX_DIR), extra_path) if p),
    }
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=layout / "hsae", capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip


def test_python_subprocesses_are_sandboxed_too(layout, tmp_path):
    ok = child(layout, "print(open('tests/ok.csv').read().strip())")
    assert ok.returncode == 0 and ok.stdout == "a\n", ok.stderr
    # Even a read whose error is caught is recorded for the parent to fail the test.
    caught = child(layout, "try:\n    open('../shared/data/x.csv')\nexcept OSError:\n    pass")
    assert caught.returncode == 0, caught.stderr
    assert f"open {layout / 'shared' / 'data' / 'x.csv'}" in (layout / "refused.log").read_text()
    bad = child(layout, "import os; os.listdir('../shared/data')")
    assert bad.returncode != 0 and "outside the clone" in bad.stderr
    # glob swallows the error and finds nothing; the log still has the listing.
    globbed = child(layout, "import glob; assert glob.glob('../shared/data/*.csv') == []")
    assert globbed.returncode == 0, globbed.stderr
    assert f"os.scandir {layout / 'shared' / 'data'}" in (layout / "refused.log").read_text()
    # The environment's own sitecustomize, which ours shadows, still runs.
    other = tmp_path / "other_site"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import builtins\nbuiltins.OTHER_SITE = 1\n")
    chained = child(layout, "import builtins; print(builtins.OTHER_SITE)", str(other))
    assert chained.returncode == 0 and chained.stdout == "1\n", chained.stderr


def test_this_session_is_sandboxed():
    """The session's own hook (unless HSAE_TEST_SANDBOX=0 or the clone lies in the temp
    folder, which the session header reports): a read beside this clone is refused."""
    if conftest.SANDBOX is None:
        assert os.environ.get("HSAE_TEST_SANDBOX") != "1"
        return
    assert os.environ[ENV_CLONE] == str(ROOT)
    beside = ROOT.parent / "hsae-sandbox-probe-absent.csv"
    with pytest.raises(PermissionError, match="outside the clone"):
        open(beside)  # noqa: SIM115
    (refused,) = conftest._sandbox_violations()  # consumed: this test passes
    assert refused.startswith(f"open {beside} (pid {os.getpid()}")
