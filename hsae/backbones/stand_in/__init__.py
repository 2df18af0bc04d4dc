"""Stand-in backbones trained by hsae on ``synthetic_tree`` (issue #13): same architecture,
data, augmentation, steps and budget, differing only in the objective (``flat`` | ``hier``).

- ``models``: architectures (``ARCHITECTURES``, extended by e.g. CAST);
- ``objectives``: the flat and hierarchical losses;
- ``train``: the recipe (``Recipe``) and the training loop;
- ``store``: the content-addressed store and ``ensure_stand_in``;
- ``adapter``: ``StandInBackbone``, the ``Backbone`` for ``backbone.loader=stand_in``.

See docs/stand_ins.md.
"""

from hsae.backbones.stand_in.models import ARCHITECTURES
from hsae.backbones.stand_in.objectives import OBJECTIVES
from hsae.backbones.stand_in.store import ensure_stand_in, load_stand_in, stand_in_root
from hsae.backbones.stand_in.train import Recipe

__all__ = [
    "ARCHITECTURES",
    "OBJECTIVES",
    "Recipe",
    "ensure_stand_in",
    "load_stand_in",
    "stand_in_root",
]
