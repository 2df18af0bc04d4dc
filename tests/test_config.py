"""Every config group option composes onto the typed schema and builds valid objects."""

import pytest
from omegaconf import OmegaConf

from hsae.config import RunConfig, flatten, to_objects
from hsae.errors import HsaeError
from tests.conftest import CONF_DIR

GROUPS = ["backbone", "dataset", "sae", "trainer", "logger", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda v: str(v)
)
def test_every_option_composes(compose, group, option):
    cfg = compose([f"{group}={option}"])
    run = to_objects(cfg, RunConfig)
    assert isinstance(run, RunConfig)
    assert run.sae.n_latents > 0


def test_n_latents_is_derived_from_width(compose):
    cfg = compose(["sae.expansion=4"])
    assert cfg.sae.n_latents == 4 * cfg.backbone.d_model


def test_misspelt_key_fails_at_compose(compose):
    with pytest.raises(Exception, match="layr"):
        compose(["backbone.layr=3"])


def test_wrong_type_fails_at_compose(compose):
    with pytest.raises(Exception, match="k"):
        compose(["sae.k=many"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("backbone.tokens=pixels", "backbone.tokens"),
        ("sae.k=100000", "sae.k"),
        ("cache.dtype=int8", "cache.dtype"),
        ("optim.decay_fraction=2", "optim.decay_fraction"),
        ("logger.mode=sometimes", "logger.mode"),
    ],
)
def test_bad_values_name_the_key(compose, override, message):
    with pytest.raises(HsaeError, match=message):
        to_objects(compose([override]), RunConfig)


def test_flatten_gives_dotted_keys(compose):
    flat = flatten(OmegaConf.to_container(compose([]), resolve=True))
    assert flat["backbone.layer"] == 2
    assert flat["sae.arch"] == "topk"
    assert "sae.n_latents" in flat
