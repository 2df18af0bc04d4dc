"""Speed options change how a run computes, never what: torch.compile, rows on the device,
rows held in memory as stored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hsae.cache import ActivationCache
from hsae.training.data import CacheDataModule


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("speed_cache")


@pytest.fixture(scope="module")
def train_in_process(compose, cache_dir):
    from hsae.training.run import train

    def _train(run_dir, *overrides: str):
        cfg = compose(["experiment=smoke", "logger=csv", f"cache.dir={cache_dir}", *overrides])
        return train(cfg, run_dir)

    return _train


def train_cache(cache_dir):
    return next(p for p in cache_dir.iterdir() if "-train_" in p.name and p.is_dir())


def test_compiled_run_ends_with_the_eager_weights(train_in_process, tmp_path, monkeypatch):
    eager = train_in_process(tmp_path / "eager")
    compiled_calls = []
    original = nn.Module.compile

    def compile_fast(self, *args, **kwargs):
        # Dynamo and AOT autograd trace the step as with inductor; skip only its C++ codegen,
        # which takes ~1 min on a 2-core CPU (bench/sae_step.py --compile times inductor).
        compiled_calls.append(type(self).__name__)
        original(self, *args, **{"backend": "aot_eager", **kwargs})

    monkeypatch.setattr(nn.Module, "compile", compile_fast)
    compiled = train_in_process(tmp_path / "compiled", "optim.compile=true")
    assert compiled_calls == ["TopKSAE"]
    a, b = (
        load_file(tmp_path / "eager" / "sae.safetensors"),
        load_file(tmp_path / "compiled" / "sae.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    assert compiled["fvu"] == pytest.approx(eager["fvu"], rel=1e-3)


def test_rows_in_memory_stay_in_the_storage_dtype(train_in_process, cache_dir, tmp_path):
    train_in_process(tmp_path / "run")  # builds the cache (or reuses it)
    path = train_cache(cache_dir)
    cache = ActivationCache.open(path)
    data = CacheDataModule(cache, cache, batch_size=64, in_memory=True)
    data.setup()
    assert data.train_rows.data.dtype == torch.float16  # half of float32's RAM
    rows = [5, 0, 17, 3]
    batch = data.train_rows.__getitems__(rows)
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch, cache.read(np.asarray(rows)), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rows_move_to_the_gpu_when_they_fit(train_in_process, cache_dir, tmp_path):
    import lightning as L

    from hsae.training.module import SAEModule

    run = train_in_process(tmp_path / "gpu", "trainer=gpu")
    assert run["fvu"] < 1
    path = train_cache(cache_dir)
    data = CacheDataModule(ActivationCache.open(path), ActivationCache.open(path), batch_size=64)
    module = SAEModule(sae={"arch": "topk", "d_model": 128, "n_latents": 256, "k": 4})
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert data.train_rows.device.type == "cuda"
