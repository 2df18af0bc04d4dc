"""Export to SAELens' on-disk format and back: the files as SAELens >= 6 lays them out, their
meaning checked against SAELens' inference rules written out here, exact round trips, and
SAELens itself loading the folder (sae-lens is in the dev extra)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hsae.errors import HsaeError
from hsae.sae import load_sae, make_sae, save_sae
from hsae.sae.saelens import export_run, export_saelens, import_saelens


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


D, L = 6, 16
# name -> (hsae arch, kwargs, SAELens architecture)
EXPORTABLE = {
    "relu": ("relu", dict(l1_coeff=0.7), "standard"),
    "topk": ("topk", dict(k=3), "topk"),
    "batchtopk": ("batchtopk", dict(k=3, threshold_momentum=0.25), "jumprelu"),
    "jumprelu": ("jumprelu", dict(bandwidth=0.2, init_threshold=0.1), "jumprelu"),
    "gated": ("gated", dict(l1_coeff=0.4), "gated"),
    "matryoshka": ("matryoshka", dict(k=3, group_fractions=[0.25, 0.75]), "jumprelu"),
    "matryoshka_topk": (
        "matryoshka",
        dict(k=3, group_fractions=[0.25, 0.75], activation="topk"),
        "topk",
    ),
}


def data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, D, generator=g) * 2 + 0.5) * 37


def trained(name: str):
    """A few steps on inputs of norm ~200, input scale set: the export must fold it."""
    arch, kwargs, _ = EXPORTABLE[name]
    torch.manual_seed(0)
    sae = make_sae(arch, d_model=D, n_latents=L, **kwargs)
    x = data(96, 1)
    sae.set_input_scale(x)
    sae.init_b_pre(x, "mean")
    with torch.no_grad():
        for pname, param in sae.named_parameters():
            if pname.startswith(("b_enc", "b_gate", "b_mag", "r_mag")):
                param.normal_(std=0.3)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step in range(3):
        out = sae.train()(x[step * 32 : (step + 1) * 32])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return sae.eval()


def saelens_reference(cfg: dict, w: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens' inference rules (``SAE.encode``/``decode`` of each architecture), written
    from its documented behaviour: ``(codes, x_hat)``."""
    arch = cfg["architecture"]
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    if arch == "gated":
        gate = (sae_in @ w["W_enc"] + w["b_gate"] > 0).float()
        codes = gate * (sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"]).relu()
        return codes, codes @ w["W_dec"] + w["b_dec"]
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        codes = pre.relu()
    elif arch == "jumprelu":
        codes = pre.relu() * (pre > w["threshold"]).float()
    elif arch == "topk":
        top = pre.topk(cfg["k"], dim=-1)
        codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    else:
        raise AssertionError(arch)
    return codes, codes @ w["W_dec"] + w["b_dec"]


def read(folder) -> tuple[dict, dict]:
    return json.loads((folder / "cfg.json").read_text()), load_file(
        str(folder / "sae_weights.safetensors")
    )


# ---- the files -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPORTABLE))
def test_export_writes_saelens_files_that_compute_the_same_codes(name, tmp_path):
    sae = trained(name)
    export_saelens(sae, tmp_path, {"model_name": "ViT-B-16", "hook_name": "blocks.3"})
    cfg, w = read(tmp_path)
    assert cfg["architecture"] == EXPORTABLE[name][2]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D, L, "float32")
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == cfg["reshape_activations"] == "none"
    meta = cfg["metadata"]
    assert (meta["model_name"], meta["hook_name"]) == ("ViT-B-16", "blocks.3")
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6  # else read as a pre-6 config
    assert w["W_enc"].shape == (D, L) and w["W_dec"].shape == (L, D)
    assert w["b_dec"].shape == (D,)
    expected_keys = {
        "standard": {"W_enc", "b_enc", "W_dec", "b_dec"},
        "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
        "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
        "gated": {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"},
    }[cfg["architecture"]]
    assert set(w) == expected_keys  # SAELens loads strictly
    if cfg["architecture"] == "topk":
        assert cfg["k"] == 3 and cfg["rescale_acts_by_decoder_norm"] is False
    x = data(40, 2)
    codes, x_hat = saelens_reference(cfg, w, x)
    torch.testing.assert_close(codes, sae.encode(x))
    torch.testing.assert_close(x_hat, sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-4)


def test_batchtopk_exports_its_threshold_for_every_latent(tmp_path):
    sae = trained("batchtopk")
    export_saelens(sae, tmp_path)
    _, w = read(tmp_path)
    torch.testing.assert_close(w["threshold"], torch.full((L,), float(sae.threshold)))


@pytest.mark.parametrize("name", sorted(EXPORTABLE))
def test_export_then_import_round_trips_exactly(name, tmp_path):
    sae = trained(name)
    (tmp_path / "run").mkdir()
    save_sae(sae, tmp_path / "run")
    folded = load_sae(tmp_path / "run").eval()  # what the export holds: the scale folded in
    export_saelens(sae, tmp_path / "saelens")
    back = import_saelens(tmp_path / "saelens")
    assert type(back) is type(sae) and back.config() == sae.config()
    assert back.folded_input_scale == pytest.approx(float(sae.input_scale))
    assert not back.training
    x = data(40, 3)
    torch.testing.assert_close(back.encode(x), folded.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(back(x).x_hat, folded(x).x_hat, rtol=0, atol=0)
    torch.testing.assert_close(back.encode(x), sae.encode(x))


def test_hierarchical_and_untrained_batchtopk_are_refused(tmp_path):
    sae = make_sae("hierarchical", d_model=D, n_latents=L, k=2, n_children=3)
    with pytest.raises(HsaeError, match=r"hierarchical.*cannot be exported to SAELens"):
        export_saelens(sae, tmp_path)
    with pytest.raises(HsaeError, match="never trained"):
        export_saelens(make_sae("batchtopk", d_model=D, n_latents=L, k=3), tmp_path)
    with pytest.raises(HsaeError, match="written by hsae"):
        export_saelens(trained("topk"), tmp_path, {"sae_lens_version": "5.0.0"})
    assert not (tmp_path / "cfg.json").exists()


# ---- SAELens folders hsae did not write ----------------------------------------------------


def write_folder(folder, cfg: dict, w: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    base = {"d_in": D, "d_sae": L, "dtype": "float32", "device": "cpu"}
    meta = {"metadata": {"sae_lens_version": "6.5.0", "model_name": "gpt2"}}
    (folder / "cfg.json").write_text(json.dumps(base | meta | cfg))
    save_file({k: v.contiguous() for k, v in w.items()}, str(folder / "sae_weights.safetensors"))


def foreign_weights(seed: int, arch: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(D, L, generator=g),
        "W_dec": torch.randn(L, D, generator=g),
        "b_dec": torch.randn(D, generator=g),
    }
    if arch == "gated":
        w |= {name: torch.randn(L, generator=g) * 0.3 for name in ("b_gate", "r_mag", "b_mag")}
    else:
        w["b_enc"] = torch.randn(L, generator=g)
    if arch == "jumprelu":
        w["threshold"] = torch.rand(L, generator=g) + 0.1
    return w


@pytest.mark.parametrize(
    "cfg,hsae_arch",
    [
        (dict(architecture="standard", apply_b_dec_to_input=True), "relu"),
        (dict(architecture="standard", apply_b_dec_to_input=False), "relu"),
        (dict(architecture="topk", k=4, normalize_activations="expected_average_only_in"), "topk"),
        (dict(architecture="topk", k=4, rescale_acts_by_decoder_norm=True), "topk"),
        (dict(architecture="jumprelu", apply_b_dec_to_input=False), "jumprelu"),
        (dict(architecture="gated", apply_b_dec_to_input=False), "gated"),
        (dict(architecture="gated"), "gated"),
    ],
)
def test_import_of_saelens_folders_computes_what_saelens_computes(cfg, hsae_arch, tmp_path):
    w = foreign_weights(4, cfg["architecture"])
    write_folder(tmp_path, cfg, w)
    sae = import_saelens(tmp_path)
    assert sae.arch == hsae_arch and (sae.d_model, sae.n_latents) == (D, L)
    x = torch.randn(30, D, generator=torch.Generator().manual_seed(5)) * 2
    full_cfg = {"apply_b_dec_to_input": True} | cfg
    codes, x_hat = saelens_reference(full_cfg, w, x)
    if cfg.get("rescale_acts_by_decoder_norm"):  # SAELens ranks and decodes with the norms
        norms = w["W_dec"].norm(dim=-1)
        pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        top = (pre * norms).topk(4, dim=-1)
        scaled = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        codes, x_hat = scaled, (scaled / norms) @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(sae.encode(x), codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), x_hat, rtol=1e-5, atol=1e-4)
    assert sae.folded_input_scale == 1.0


@pytest.mark.parametrize(
    "cfg,w_edit,match",
    [
        (dict(architecture="transcoder"), None, r"transcoder.*importable"),
        (dict(architecture="standard", normalize_activations="layer_norm"), None, "layer_norm"),
        (dict(architecture="standard", reshape_activations="hook_z"), None, "hook_z"),
        (dict(architecture="jumprelu"), ("threshold", torch.zeros(L)), "<= 0"),
        (dict(architecture="standard"), ("W_enc", torch.zeros(D, L + 1)), r"W_enc.*shape"),
    ],
)
def test_import_refuses_what_hsae_cannot_hold(cfg, w_edit, match, tmp_path):
    w = foreign_weights(6, cfg["architecture"] if cfg["architecture"] != "transcoder" else "x")
    if w_edit is not None:
        w[w_edit[0]] = w_edit[1]
    write_folder(tmp_path, cfg, w)
    with pytest.raises(HsaeError, match=match):
        import_saelens(tmp_path)


def test_import_names_a_missing_file(tmp_path):
    with pytest.raises(HsaeError, match=r"no cfg\.json"):
        import_saelens(tmp_path)


def test_import_refuses_an_edited_hsae_export(tmp_path):
    export_saelens(trained("topk"), tmp_path)
    cfg, w = read(tmp_path)
    cfg["architecture"], w["threshold"] = "jumprelu", torch.ones(L)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(HsaeError, match="edited after export"):
        import_saelens(tmp_path)


# ---- from a run dir ------------------------------------------------------------------------


def make_run(run_dir, sae, extra: dict | None = None, cache_dir=None) -> None:
    run_dir.mkdir(exist_ok=True)
    save_sae(sae, run_dir)
    backbone = dict(name="tiny_vit", loader="open_clip", model_name="ViT-B-16", layer=3)
    cfg = {
        "sae": sae.config(),
        "backbone": backbone | dict(pretrained="openai", d_model=D, tokens="cls"),
        "dataset": {"name": "synthetic"},
        "cache": {"train": str(cache_dir)} if cache_dir else {},
    }
    (run_dir / "cfg.json").write_text(json.dumps(cfg | (extra or {})))


def test_export_run_fills_model_and_hook_names(tmp_path):
    sae = trained("topk")
    make_run(tmp_path / "run", sae)
    export_run(tmp_path / "run", tmp_path / "out")
    cfg, _ = read(tmp_path / "out")
    meta = cfg["metadata"]
    assert meta["model_name"] == "ViT-B-16" and meta["hook_name"] == "blocks.3"
    assert meta["tokens"] == "cls" and meta["hsae"]["config"] == sae.config()
    x = data(20, 7)
    torch.testing.assert_close(import_saelens(tmp_path / "out").encode(x), sae.encode(x))


def test_export_run_takes_the_layer_path_from_the_run_or_its_cache(tmp_path):
    sae = trained("relu")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"layer": {"name": "visual.blocks.3"}}))
    make_run(tmp_path / "a", sae, cache_dir=cache)
    export_run(tmp_path / "a", tmp_path / "out_a")
    assert read(tmp_path / "out_a")[0]["metadata"]["hook_name"] == "visual.blocks.3"
    make_run(tmp_path / "b", sae, extra={"layer": {"name": "trunk.blocks.3"}}, cache_dir=cache)
    export_run(tmp_path / "b", tmp_path / "out_b")
    assert read(tmp_path / "out_b")[0]["metadata"]["hook_name"] == "trunk.blocks.3"


def test_export_run_names_what_is_missing(tmp_path):
    with pytest.raises(HsaeError, match=r"cfg\.json does not exist"):
        export_run(tmp_path, tmp_path / "out")
    make_run(tmp_path, trained("topk"))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["backbone"]["layer"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(HsaeError, match=r"backbone\.layer"):
        export_run(tmp_path, tmp_path / "out")


# ---- SAELens itself ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPORTABLE))
def test_saelens_loads_the_export(name, tmp_path):
    import sae_lens as saelens

    sae = trained(name)
    export_saelens(sae, tmp_path, {"model_name": "ViT-B-16", "hook_name": "blocks.3"})
    loaded = saelens.SAE.load_from_disk(str(tmp_path))
    assert loaded.cfg.architecture() == EXPORTABLE[name][2]
    assert loaded.cfg.metadata.hook_name == "blocks.3"
    x = data(40, 8)
    with torch.no_grad():
        codes = loaded.encode(x)
        torch.testing.assert_close(codes, sae.encode(x))
        torch.testing.assert_close(loaded.decode(codes), sae.decode(codes), rtol=1e-5, atol=1e-4)
