"""Loading the CAST authors' released checkpoints into hsae's modules.

Their files (https://huggingface.co/twke/CAST, ``snapshots/...``) come in two layouts:

- MoCo-v3 runs (``snapshots/moco/imagenet1k/<arch>/checkpoint_0099.pth.tar``): the
  training state, with the model under ``state_dict`` as ``module.base_encoder.<name>``
  (the momentum encoder and predictor beside it are not used), the MoCo projection MLP
  under ``head.*`` (dropped) and fixed sin-cos position embeddings (``pos_embed`` for the
  stem grid, ``pe_token`` for the class token);
- DeiT runs (``snapshots/deit/imagenet1k/cast_small/best_checkpoint.pth``): the model
  under ``model`` with learned position embeddings whose first row is the class token's,
  and an ImageNet classifier under ``head.*`` (dropped: hsae reads the class token).

Their parameter names (the authors' ``cast_models/cast.py`` builds CAST on timm's
``VisionTransformer``) map onto hsae's as follows; ``k`` is a stage (1-4), ``j`` a block
within it, ``i`` a block counted over all stages (the same modules appear under both
``blocks.<i>`` and ``blocks<k>.<j>``, so both names are accepted):

| theirs | hsae (``CastModel``) |
| --- | --- |
| ``patch_embed.proj.<n>`` (conv, BN, ReLU x 4, then a 1x1 conv at 12) | ``stem.convs.<n>``, ``stem.proj`` |
| ``cls_token``, ``pos_embed``, ``pe_token`` | ``cls_token``, ``pos_embed``, ``cls_pos`` |
| ``blocks<k>.<j>.*`` / ``blocks.<i>.*`` | ``stages.<k-1>.blocks.<j>.*`` |
| ``pool<k>.pool_block.centroid_fc.*`` | ``stages.<k-1>.pool.centroid_block.*`` |
| ``pool<k>.pool_block.fc1.{0,1}``, ``fc2.{0,1}`` | ``stages.<k-1>.pool.fc1.{norm,linear}``, ``fc2.{norm,linear}`` |
| ``norm`` | ``norm`` |

Files are read with ``torch.load(weights_only=True)`` (tensors and plain containers only;
the DeiT runs also store their ``argparse`` arguments, which are allowed explicitly).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from hsae.backbones.cast.model import CastArch
from hsae.errors import HsaeError

LAYOUTS = ("auto", "moco", "deit", "plain")
MOCO_PREFIX = "module.base_encoder."
_STEM_CONV = 12  # index of the stem's 1x1 projection in the authors' Sequential


def read_checkpoint(path: str | Path, layout: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
    """The model's tensors from one of the authors' files, with MoCo's prefix stripped and
    the head dropped; and the layout found (moco | deit | plain)."""
    if layout not in LAYOUTS:
        raise HsaeError(f"checkpoint layout={layout!r} is not valid; use one of {LAYOUTS}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise HsaeError(
            f"backbone.pretrained={str(path)!r} is not a file; download the authors' checkpoint "
            "(docs/cast.md says which) and point backbone.pretrained at it"
        )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HsaeError(
            f"could not read {path} as a checkpoint with torch.load(weights_only=True): {e}"
        ) from e
    if not isinstance(obj, Mapping):
        raise HsaeError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    if layout == "auto":
        if isinstance(obj.get("state_dict"), Mapping):
            layout = "moco"
        elif isinstance(obj.get("model"), Mapping):
            layout = "deit"
        else:
            layout = "plain"
    if layout == "moco":
        state = obj.get("state_dict", obj)
        if not any(k.startswith(MOCO_PREFIX) for k in state):
            raise HsaeError(
                f"{path} looks like a MoCo-v3 checkpoint but has no {MOCO_PREFIX}* keys "
                f"(first keys: {sorted(state)[:5]}); is it another layout?"
            )
        state = {k[len(MOCO_PREFIX) :]: v for k, v in state.items() if k.startswith(MOCO_PREFIX)}
    elif layout == "deit":
        state = obj["model"] if isinstance(obj.get("model"), Mapping) else obj
    else:
        state = obj
    tensors = {k: v for k, v in state.items() if not k.startswith("head.")}
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise HsaeError(f"{path}: entries {bad[:10]} are not tensors; is this a model checkpoint?")
    return tensors, layout


def _rename(key: str, depths: tuple[int, ...]) -> str | None:
    """hsae's name for one of the authors' parameter names (None: not a CAST name)."""
    starts = [sum(depths[:k]) for k in range(len(depths))]
    if m := re.fullmatch(r"patch_embed\.proj\.(\d+)\.(.+)", key):
        n, rest = int(m[1]), m[2]
        return f"stem.proj.{rest}" if n == _STEM_CONV else f"stem.convs.{n}.{rest}"
    if m := re.fullmatch(r"blocks(\d)\.(\d+)\.(.+)", key):
        return f"stages.{int(m[1]) - 1}.blocks.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", key):
        i = int(m[1])
        stage = max(k for k, s in enumerate(starts) if s <= i)
        return f"stages.{stage}.blocks.{i - starts[stage]}.{m[2]}"
    if m := re.fullmatch(r"pool(\d)\.pool_block\.(.+)", key):
        rest = m[2].replace("centroid_fc.", "centroid_block.")
        rest = re.sub(r"^(fc1|fc2)\.0\.", r"\1.norm.", rest)
        rest = re.sub(r"^(fc1|fc2)\.1\.", r"\1.linear.", rest)
        return f"stages.{int(m[1]) - 1}.pool.{rest}"
    if key in ("cls_token", "norm.weight", "norm.bias"):
        return key
    return None


def map_state_dict(
    theirs: Mapping[str, torch.Tensor], arch: CastArch, expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The authors' CAST tensors renamed to hsae's; every key on both sides must match.

    ``expected``: hsae's state dict (names and shapes to fill). Raises ``HsaeError`` listing
    the authors' keys that map to nothing and hsae's keys left without a value.
    """
    grid = arch.grid**2
    out: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    for key, value in theirs.items():
        if key == "pe_token":
            targets = {"cls_pos": value}
        elif key == "pos_embed":
            if value.shape[1] == grid + 1:  # DeiT: the class token's row first
                targets = {"cls_pos": value[:, :1], "pos_embed": value[:, 1:]}
            else:
                targets = {"pos_embed": value}
        else:
            name = _rename(key, arch.depths)
            targets = {name: value} if name is not None else {}
        for name, tensor in targets.items():
            if name not in expected or tuple(expected[name].shape) != tuple(tensor.shape):
                unmatched.append(
                    key
                    if name not in expected
                    else f"{key} {tuple(tensor.shape)} "
                    f"(hsae's {name} is {tuple(expected[name].shape)})"
                )
            elif name in out and not torch.equal(out[name], tensor):
                unmatched.append(f"{key} (differs from another copy of {name})")
            else:
                out[name] = tensor
        if not targets:
            unmatched.append(key)
    _check_keys_matched(
        f"CAST {arch}",
        "hsae's",
        sorted(unmatched),
        sorted(set(expected) - set(out)),
        "Check that backbone.model_name names the checkpoint's variant (cast_small, "
        "cast_small_deep, cast_base)",
    )
    return out


def _check_keys_matched(
    model: str, whose: str, unmatched: list[str], missing: list[str], fix: str
) -> None:
    """Raise, naming up to 30 of each, when checkpoint keys match nothing in ``model`` or
    ``whose`` keys of the model get no value."""

    def shown(keys: list[str]) -> str:
        return ", ".join(keys[:30]) + (" ..." if len(keys) > 30 else "")

    if unmatched or missing:
        raise HsaeError(
            f"the checkpoint does not match {model}: {len(unmatched)} of its keys match "
            f"nothing ({shown(unmatched)}); {len(missing)} of {whose} keys get no value "
            f"({shown(missing)}). {fix}"
        )


def authors_state_dict(model_state: Mapping[str, torch.Tensor], arch: CastArch, layout: str):
    """hsae's tensors in the authors' key layout (MoCo: a ``state_dict`` with the
    ``module.base_encoder.`` prefix; DeiT: ``model``), head included: for tests, and to
    hand hsae-trained CASTs to the authors' code."""
    theirs: dict[str, torch.Tensor] = {}
    starts = [sum(arch.depths[:k]) for k in range(len(arch.depths))]
    for name, value in model_state.items():
        if name == "cls_pos":
            continue
        if name == "pos_embed":
            if layout == "deit":
                value = torch.cat([model_state["cls_pos"], value], dim=1)
            else:
                theirs["pe_token"] = model_state["cls_pos"]
            theirs["pos_embed"] = value
        elif m := re.fullmatch(r"stem\.convs\.(\d+)\.(.+)", name):
            theirs[f"patch_embed.proj.{m[1]}.{m[2]}"] = value
        elif m := re.fullmatch(r"stem\.proj\.(.+)", name):
            theirs[f"patch_embed.proj.{_STEM_CONV}.{m[1]}"] = value
        elif m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", name):
            k, j = int(m[1]), int(m[2])
            theirs[f"blocks{k + 1}.{j}.{m[3]}"] = value
            theirs[f"blocks.{starts[k] + j}.{m[3]}"] = value
        elif m := re.fullmatch(r"stages\.(\d+)\.pool\.(.+)", name):
            rest = m[2].replace("centroid_block.", "centroid_fc.")
            rest = re.sub(r"^(fc1|fc2)\.norm\.", r"\1.0.", rest)
            rest = re.sub(r"^(fc1|fc2)\.linear\.", r"\1.1.", rest)
            theirs[f"pool{int(m[1]) + 1}.pool_block.{rest}"] = value
        else:
            theirs[name] = value
    d = arch.embed_dim
    if layout == "moco":
        theirs["head.0.weight"] = torch.zeros(16, d)  # a stand-in for MoCo's projection MLP
        return {
            "epoch": 100,
            "arch": "cast",
            "state_dict": {MOCO_PREFIX + k: v for k, v in theirs.items()},
        }
    theirs["head.weight"], theirs["head.bias"] = torch.zeros(1000, d), torch.zeros(1000)
    return {"model": theirs, "epoch": 299, "args": argparse.Namespace(model="cast_small")}


def map_vit_state_dict(
    theirs: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A MoCo-v3 / DeiT ViT's tensors (timm's names already) checked against timm's model."""
    unmatched = sorted(
        k
        for k, v in theirs.items()
        if k not in expected or tuple(expected[k].shape) != tuple(v.shape)
    )
    _check_keys_matched(
        "the timm ViT",
        "the model's",
        unmatched,
        sorted(set(expected) - set(theirs)),
        "Check backbone.model_name (e.g. vit_small_patch16_224 for MoCo-v3 ViT-S)",
    )
    return dict(theirs)
