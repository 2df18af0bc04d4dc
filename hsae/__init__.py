"""hsae: sparse autoencoders on vision backbones, compared for hierarchy and interpretability.

Shape suffixes: ``acts_nk`` is ``[n, k]``, one letter per axis, each letter one meaning:

- ``n`` rows (activation rows, or images where each image is one row); ``i`` images when the
  rows are tokens; ``b`` a batch; ``t`` an image's tokens;
- ``d`` the hooked layer's width (the SAE's input); ``e`` an embedding's width (joint
  image-text space);
- ``k`` the SAE's latents; ``a`` the active latents of one row (TopK's ``k`` of them);
- ``l`` the hierarchy's levels (``labels_nl``); ``c`` classes, or HierarCaps caption chains;
- ``v`` vocabulary entries; ``h``, ``w`` a patch grid's height and width.
"""

from hsae.errors import HsaeError

__all__ = ["HsaeError"]
__version__ = "0.1.0"
