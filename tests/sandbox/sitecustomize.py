"""Imported at start-up by every Python subprocess of the test run (tests/conftest.py puts
this folder first on ``PYTHONPATH``): installs the test sandbox's audit hook, then runs the
environment's own ``sitecustomize``, if any, which this module shadows."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

import hsae_test_sandbox  # beside this file, on PYTHONPATH

hsae_test_sandbox.install_from_env()

_here = os.path.dirname(os.path.abspath(__file__))
_others = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _others)
if _spec is not None and _spec.loader is not None:
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["sitecustomize"] = _module
    _spec.loader.exec_module(_module)
