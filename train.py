"""Train an SAE on a backbone's cached activations: ``python train.py [overrides]``.

Returns the configured metric (``objective``) for Hydra sweepers; for an SAE bank
(``bank=[...]``), the best (lowest, as sweepers here minimise) objective over its members. With ``study=<name>``
it runs the whole study instead (``hsae.study``, docs/study.md) and returns 0.
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
    if cfg.get("study") is not None:  # the whole study: hsae.study (docs/study.md)
        from hsae.study.run import run_study

        run_study(cfg, HydraConfig.get().runtime.output_dir)
        return 0.0
    from hsae.training.bank import check_members

    check_members(cfg)  # config errors, bank entries included, fail before the heavy imports
    from hsae.training.run import train  # heavy imports after Hydra has parsed the command

    check_ddp_launcher(cfg.trainer.strategy, cfg.trainer.devices)
    name, group = job_labels()
    with isolated_job(__file__):
        metrics = train(cfg, HydraConfig.get().runtime.output_dir, name=name, group=group)
    members = metrics if isinstance(metrics, list) else [metrics]
    return min(sweep_objective(m, cfg.objective, cfg.target_l0, cfg.l0_penalty) for m in members)


if __name__ == "__main__":
    register_configs()
    main()
