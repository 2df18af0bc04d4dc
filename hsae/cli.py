"""What the entry points share: user errors on one line, without a traceback."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from hsae.errors import HsaeError

log = logging.getLogger("hsae")


def user_errors_exit(task: Callable[..., Any]) -> Callable[..., Any]:
    """In a single run, an ``HsaeError`` prints ``error: ...`` and exits with status 2.

    In a multirun it propagates, so the launcher marks that job failed and goes on.
    """

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except HsaeError as e:
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
