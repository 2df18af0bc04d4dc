"""Wall time of the README's main job (`python train.py`) on this machine.

Runs it twice in a fresh temporary folder: cold (builds the activation caches) and warm
(reuses them), and prints both with the final metrics. Usage: python bench/default_job.py
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"HSAE_CACHE_DIR": f"{tmp}/cache", "WANDB_MODE": "offline"}
        for label in ("cold cache", "warm cache"):
            run_dir = Path(tmp) / label.replace(" ", "_")
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}"],
                cwd=tmp,
                env=env,
                check=True,
                capture_output=True,
            )
            seconds = time.perf_counter() - start
            metrics = json.loads((run_dir / "metrics.json").read_text())
            print(f"{label}: {seconds:.1f} s  {metrics}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
    )


if __name__ == "__main__":
    main()
