"""The test sandbox: no test reads anything beside the clone.

A fresh clone has nothing beside it, so a test that opens ``../shared/...`` (or any other
folder next to the checkout) passes on the development machine and fails for everyone
else. tests/conftest.py installs :class:`Sandbox` as an audit hook (PEP 578) in the pytest
process, and ``sitecustomize.py`` in this folder installs it in every Python subprocess a
test starts (``train.py``, Hydra's joblib workers, DDP ranks), through ``PYTHONPATH``.

What is checked: every ``open`` (builtin ``open``, ``io.open``, ``os.open``, module source
read by imports) and every directory listing (``os.listdir``, ``os.scandir``, so ``glob``
and ``Path.iterdir`` too) of a path, after resolving symlinks. A path is refused when it
lies under the clone's parent folder but not inside the clone, unless it is part of the
environment: the interpreter and its site-packages, ``sys.path``, the temp folder, the
system folders (``/usr``, ``/etc``, ``/proc``, ``/dev``, ...), the hidden entries of the
home folder (``~/.cache``, ``~/.config``, ``~/.netrc``) and the cache folders named by the
usual environment variables (``HF_HOME``, ``TORCH_HOME``, ``WANDB_DIR``, ``XDG_*``...).
A refused path raises ``PermissionError`` and is recorded, so a test that catches the
error still fails (conftest reads the records after each test).

Not seen: files opened by native code without Python's ``open`` (safetensors' Rust reader,
C++ ``torch.load(mmap=True)``, decoders called on a path) and by non-Python subprocesses.
The datasets and loaders under test open their files from Python first (PIL, numpy,
``csv``, ``json``), which is what matters for test data.
"""

from __future__ import annotations

import functools
import os
import site
import sys
import tempfile
import threading

ENV_CLONE = "HSAE_SANDBOX_CLONE"  # the clone's root; set => subprocesses install the hook
ENV_LOG = "HSAE_SANDBOX_LOG"  # file the subprocesses append refused paths to
EVENTS = frozenset({"open", "os.listdir", "os.scandir"})
SYSTEM = ("/usr", "/etc", "/proc", "/dev", "/sys", "/run", "/var", "/lib", "/lib32", "/lib64",
          "/bin", "/sbin", "/nix")  # fmt: skip
CACHE_VARS = (
    "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE",
    "TORCH_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "XDG_CACHE_HOME",
    "XDG_CONFIG_HOME", "XDG_DATA_HOME", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR",
    "WANDB_DATA_DIR", "MPLCONFIGDIR", "PIP_CACHE_DIR", "NLTK_DATA", "TMPDIR",
)  # fmt: skip


class SandboxError(RuntimeError):
    """The sandbox cannot check this layout (the clone's parent is the temp folder)."""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@functools.lru_cache(maxsize=1 << 16)
def _real(path: str) -> str:
    return os.path.realpath(path)


class Sandbox:
    """Refuses reads beside ``clone``; ``violations`` lists the refused paths."""

    def __init__(self, clone: str | os.PathLike, log: str | os.PathLike | None = None):
        self.clone = os.path.realpath(clone)
        self.parent = os.path.dirname(self.clone)
        self.log = os.fspath(log) if log is not None else None
        self.home = os.path.realpath(os.path.expanduser("~"))
        temp = os.path.realpath(tempfile.gettempdir())
        if self.parent == temp:
            raise SandboxError(
                f"the clone {self.clone} lies directly in the temp folder {temp}, where tests "
                "write their scratch files, so reads beside it cannot be told from scratch "
                "files; clone into a folder of its own (e.g. {temp}/work/hsae) to check"
            )
        roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, temp}
        roots.update(SYSTEM)
        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
        roots.update(os.environ[v] for v in CACHE_VARS if os.environ.get(v))
        roots.update(p for p in sys.path if p and os.path.isabs(p))
        roots = {os.path.realpath(r) for r in roots}
        # A root that holds the parent would allow every sibling: only roots inside count.
        self.allowed = tuple(sorted(r for r in roots if _inside(r, self.parent) and
                                    not _inside(self.parent, r)))  # fmt: skip
        self.violations: list[str] = []
        self.n_checked = 0
        self._local = threading.local()

    def forbidden(self, path: str | bytes | os.PathLike) -> bool:
        """Whether reading ``path`` (relative to the cwd) is reading beside the clone."""
        real = _real(os.path.abspath(os.fsdecode(path)))
        if not _inside(real, self.parent) or real == self.parent or _inside(real, self.clone):
            return False
        if any(_inside(real, root) for root in self.allowed):
            return False
        if _inside(real, self.home) and real != self.home:
            first = os.path.relpath(real, self.home).split(os.sep, 1)[0]
            if first.startswith("."):  # ~/.cache, ~/.config, ~/.netrc: the user's settings
                return False
        return True

    def hook(self, event: str, args: tuple) -> None:
        if event not in EVENTS or getattr(self._local, "busy", False):
            return
        path = args[0] if args else None
        if path is None:  # os.scandir() / os.listdir(): the cwd
            path = "."
        if isinstance(path, int):  # an open file descriptor: its path was checked
            return
        self._local.busy = True  # opening the log below must not come back here
        try:
            self.n_checked += 1
            if not self.forbidden(path):
                return
            real = _real(os.path.abspath(os.fsdecode(path)))
            self.violations.append(f"{event} {real}")
            if self.log is not None:
                with open(self.log, "a", encoding="utf-8") as f:
                    f.write(f"{event} {real} (pid {os.getpid()}: {' '.join(sys.argv)[:200]})\n")
        finally:
            self._local.busy = False
        raise PermissionError(
            f"hsae test sandbox: {real} is outside the clone {self.clone}; a fresh clone has "
            "nothing beside it. Put test data in tests/data/ or build it in the test "
            "(tests/sandbox/hsae_test_sandbox.py)"
        )

    def install(self) -> Sandbox:
        global _installed
        if _installed is not None:
            raise SandboxError(f"a sandbox for {_installed.clone} is already installed")
        sys.addaudithook(self.hook)  # audit hooks cannot be removed: one per process
        _installed = self
        return self


_installed: Sandbox | None = None


def installed() -> Sandbox | None:
    """This process's sandbox (tests import conftest twice, as ``conftest`` and as
    ``tests.conftest``: both share the one hook)."""
    return _installed


def install_from_env() -> Sandbox | None:
    """In a subprocess started by a test: install the hook the parent asked for."""
    clone = os.environ.get(ENV_CLONE)
    if not clone:
        return None
    return Sandbox(clone, os.environ.get(ENV_LOG)).install()
