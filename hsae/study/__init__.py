"""The study (issue #13): backbones of two kinds -> step 1 per backbone and layer -> SAEs over
a width x sparsity grid and seeds -> step 3 per SAE -> comparison at matched L0 with a
hierarchical bootstrap -> a verdict per metric family -> a report.

- ``config``: ``StudyConfig`` (``study=<name>``, conf/study/);
- ``plan``: the units (backbone x seed x layer) and jobs (unit x SAE seed, one SAE bank each);
- ``run``: ``run_study``, the orchestration (reuses every finished artifact);
- ``compare``: matched-L0 curves, the hierarchical bootstrap, paired tests, effect sizes;
- ``verdict``: metric families and the plain-language verdict;
- ``report``: ``report.md``, the PNGs and the W&B ``compare`` run, from ``results.json``.

See docs/study.md.
"""
