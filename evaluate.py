"""Evaluate a finished run: ``python evaluate.py run_dir=<run dir>``; writes eval.json there."""

import hydra
from omegaconf import DictConfig

from hsae.cli import user_errors_exit
from hsae.config import register_configs


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    from hsae.evaluation import evaluate_run, format_table

    metrics = evaluate_run(cfg.run_dir, cfg.split, cfg.batch_size, cfg.device)
    print(format_table(metrics))
    print(f"wrote {cfg.run_dir}/eval.json")


if __name__ == "__main__":
    register_configs()
    main()
