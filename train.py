"""Train an SAE on a backbone's cached activations: ``python train.py [overrides]``.

Returns the configured metric (``objective``) for Hydra sweepers.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from hsae.cli import (
    check_ddp_launcher,
    isolated_job,
    job_labels,
    sweep_objective,
    user_errors_exit,
)
from hsae.config import register_configs


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@user_errors_exit
def main(cfg: DictConfig) -> float:
    from hsae.training.run import train  # heavy imports after Hydra has parsed the command

    check_ddp_launcher(cfg.trainer.strategy, cfg.trainer.devices)
    name, group = job_labels()
    with isolated_job(__file__):
        metrics = train(cfg, HydraConfig.get().runtime.output_dir, name=name, group=group)
    return sweep_objective(metrics, cfg.objective, cfg.target_l0, cfg.l0_penalty)


if __name__ == "__main__":
    register_configs()
    main()
