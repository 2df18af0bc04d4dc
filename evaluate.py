"""Evaluate a finished run, or compare many:

python evaluate.py run_dir=<run dir>        # metrics on the held-out split -> eval.json,
                                            # feature browser -> <run dir>/browser/
python evaluate.py compare=<multirun dir>   # tables + plots -> <multirun dir>/compare/
"""

import hydra
from omegaconf import DictConfig

from hsae.cli import user_errors_exit
from hsae.config import EvalConfig, register_configs, to_objects


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@user_errors_exit
def main(cfg_dict: DictConfig) -> None:
    cfg: EvalConfig = to_objects(cfg_dict, EvalConfig)
    if cfg.compare is not None:
        from hsae.compare import compare

        for label, path in compare(cfg.compare, cfg.x, cfg.y, logger_cfg=cfg.logger).items():
            print(f"{label}: {path}")
        return
    from hsae.evaluation import evaluate_run, format_table, hierarchy_of_backbone

    if cfg.backbone is not None:
        if cfg.layer is not None:
            cfg.backbone.layer = cfg.layer
        metrics, path = hierarchy_of_backbone(
            cfg.backbone, cfg.dataset, cfg.cache, cfg.split, cfg.out_dir, cfg.device
        )
        print(format_table(metrics))
        print(f"wrote {path}")
        return
    if cfg.export_saelens is not None:
        from hsae.sae.saelens import export_run

        print(f"SAELens folder: {export_run(cfg.run_dir, cfg.export_saelens)}")
    step3_kwargs = dict(
        split=cfg.split, batch_size=cfg.batch_size, device=cfg.device, interp=cfg.interp,
        reference=cfg.reference, n_top=cfg.n_top, control=cfg.control, names=cfg.names,
        names_vocab=cfg.names_vocab,
    )  # fmt: skip
    if cfg.browser:  # step 3, then the pages from its activations (hsae.browser consumes it)
        from hsae.browser import evaluate_with_browser

        metrics = evaluate_with_browser(cfg.run_dir, **step3_kwargs)
    else:
        metrics = evaluate_run(cfg.run_dir, **step3_kwargs)
    print(format_table(metrics))
    print(f"wrote {cfg.run_dir}/eval.json")


if __name__ == "__main__":
    register_configs()
    main()
