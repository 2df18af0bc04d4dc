"""hsae: sparse autoencoders on vision backbones, compared for hierarchy and interpretability."""

from hsae.errors import HsaeError

__all__ = ["HsaeError"]
__version__ = "0.1.0"
