"""The study's typed config (``study=<name>``, conf/study/): which backbones of which kinds,
which layers, the SAE grid and seeds, and how the comparison is made.

The schemas live in ``hsae.config.study``, beside every other config group's
(``RunConfig.study`` holds one, and configs import no pipeline stage); the study's modules
import them from here.
"""

from hsae.config.study import STUDY_ROLES, KindConfig, StudyConfig

__all__ = ["STUDY_ROLES", "KindConfig", "StudyConfig"]
