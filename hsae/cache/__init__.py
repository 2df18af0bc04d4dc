"""The activation cache: a backbone's activations at one layer over one dataset split.

A cache is a folder named by a hash of everything that determines its contents (backbone
and its image-tower weight fingerprint, layer, token selection, dataset and split and its
files, preprocessing, storage dtype). Inside:

- ``shard-NNNNN.npy``: ``[rows, d]`` activations in the storage dtype (memory-mappable;
  bfloat16 is stored as its uint16 bit pattern), each with a ``shard-NNNNN.json`` receipt
  (rows, bytes, sha256, the images it covers, the images it skipped);
- ``labels.npy``: ``[n_images, n_levels]`` labels of every dataset image;
- ``image_ids.npy`` (only when some images were skipped, or for an activations file): the
  dataset index of each cached image, in row order;
- ``images.txt``: the name of each dataset image (its file path inside the dataset);
- ``manifest.json``: written last, so a folder without it is unfinished.

Row ``r`` comes from image ``image_ids[r // tokens_per_image]`` (``r // tokens_per_image``
when there are no ``image_ids``) and token ``token_index[r % tokens_per_image]`` (``-1``:
mean-pooled, or unknown for an activations file).

Variable token counts (``tokens=segments``, CAST's segment tokens): ``tokens_per_image`` is
null and ``row_index.npy`` (``[rows, 2]``: dataset image, token) gives each row's image and
token; ``segment_trees.npz`` holds each image's part-whole segment tree (``SegmentTreeStore``).

Each shard is written to a temporary name and renamed; a killed build resumes from the
shards whose receipts match. Concurrent builders of one cache serialise on a file lock next
to the folder: the first builds, the others wait and reuse it. ``docs/cache.md`` has more.

Modules: ``key`` (the request, its spec and key, the folder name), ``files`` (file names,
storage dtypes, atomic writers), ``build`` (``get_or_build``), ``reader``
(``ActivationCache``), ``segments`` (segment trees of ragged caches), ``shuffled``
(``ShuffledRowReader`` for training).
"""

from hsae.cache.build import get_or_build
from hsae.cache.files import MANIFEST
from hsae.cache.key import CacheRequest, resolve_device
from hsae.cache.reader import ActivationCache
from hsae.cache.segments import SegmentTreeStore
from hsae.cache.shuffled import ShuffledRowReader

__all__ = [
    "MANIFEST",
    "ActivationCache",
    "CacheRequest",
    "SegmentTreeStore",
    "ShuffledRowReader",
    "get_or_build",
    "resolve_device",
]
