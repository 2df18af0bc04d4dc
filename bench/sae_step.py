"""TopK SAE training throughput: a plain PyTorch step vs hsae's, same run, same device.

Sides (tokens = rows per second, each over the same random batches):

- plain: the baseline as a researcher writes it, independent of hsae: encoder matmul,
  ``torch.topk``, codes scattered into a dense matrix, dense decoder, normalised MSE,
  backward, Adam (``fused=True`` on CUDA), bf16 autocast on CUDA.
- hsae dense: ``TopKSAE(sparse_kernels=False)`` and hsae's step (gradient component along
  each decoder row removed, Adam, rows renormalised): the same math as hsae's default,
  through dense products.
- hsae: ``TopKSAE`` with its sparse kernels (``hsae.sae.sparse``), the same step.
- hsae triton (CUDA only): the same with the Triton kernels for the sparse gradients
  (``HSAE_TRITON=1`` in training).
- hsae compiled (``--compile``): the same, its forward through ``torch.compile``.
- lightning (``--lightning``): hsae's default end to end, ``Trainer.fit`` of ``SAEModule``
  over a real activation cache (float16 shards) with the rows in memory (on the GPU when
  there is one), timed from step ``warmup`` to the last step by a callback.

Reported: tokens/s (best of the repeats), the ratio to plain, peak GPU memory; and that the
sparse step's loss matches the dense one's on the first batch.

Usage: python bench/sae_step.py [--d 768] [--latents 24576] [--k 32] [--batch 4096]
                                [--steps 5] [--warmup 2] [--repeats 2] [--device auto]
                                [--threads N] [--compile] [--lightning] [--dead 0.0]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch

from hsae.sae import TopKSAE
from hsae.sae import sparse as sparse_mod
from hsae.training.module import SAEModule


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def adam(params, device: torch.device, lr: float = 1e-4) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, fused=device.type == "cuda")


class PlainTopK(torch.nn.Module):
    """The plain baseline: dense everything."""

    def __init__(self, d: int, n_latents: int, k: int):
        super().__init__()
        self.k = k
        self.b_pre = torch.nn.Parameter(torch.zeros(d))
        self.W_dec = torch.nn.Parameter(torch.randn(n_latents, d) / d**0.5)
        self.W_enc = torch.nn.Parameter(self.W_dec.detach().T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(n_latents))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_pre) @ self.W_enc + self.b_enc
        top = pre.topk(self.k, dim=-1)
        codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        x_hat = codes @ self.W_dec + self.b_pre
        return (x_hat - x).pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean()


def plain_side(args, device, batches):
    model = PlainTopK(args.d, args.latents, args.k).to(device)
    opt = adam(model.parameters(), device)

    def step(x: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            loss = model.loss(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def hsae_side(args, device, sparse: bool, compile: bool = False, triton: bool = False):
    torch.manual_seed(0)
    sparse_mod.USE_TRITON = triton  # the torch sparse ops unless asked
    sae = TopKSAE(args.d, args.latents, args.k, dead_tokens_threshold=10**12).to(device)
    sae.sparse_kernels = sparse
    if args.dead:
        sae.rows_since_fired[: int(args.dead * args.latents)] = 10**13  # AuxK on these
    if compile:
        sae.compile()
    opt = adam(sae.parameters(), device)

    def step(x: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            out = sae(x)
        out.loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        return out.loss

    return step


def time_side(step, batches, warmup: int, device) -> float:
    """Seconds per step after ``warmup`` steps."""
    for x in batches[:warmup]:
        step(x)
    sync(device)
    start = time.perf_counter()
    for x in batches[warmup:]:
        step(x)
    sync(device)
    return (time.perf_counter() - start) / (len(batches) - warmup)


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            sync(module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module):
        sync(module.device)
        self.end = time.perf_counter()
        self.steps = trainer.global_step - self.warmup


def lightning_side(args, device, n_steps: int) -> float:
    """Seconds per step of ``Trainer.fit`` over a float16 activation cache in memory."""
    from hsae.cache import CacheRequest, get_or_build
    from hsae.data.activations import ActivationArray
    from hsae.training.data import CacheDataModule

    with tempfile.TemporaryDirectory() as tmp:
        rows = np.random.default_rng(0).standard_normal((args.batch * n_steps, args.d))
        np.save(Path(tmp) / "acts.npy", rows.astype(np.float32))
        source = ActivationArray(str(Path(tmp) / "acts.npy"), "train", val_fraction=0.01)
        cache = get_or_build(Path(tmp) / "cache", None, None, source, CacheRequest(0, "cls"))
        data = CacheDataModule(cache, cache, batch_size=args.batch)
        sae = {"arch": "topk", "d_model": args.d, "n_latents": args.latents, "k": args.k}
        module = SAEModule(sae=sae, lr=1e-4, warmup_steps=1, compile=args.compile)
        timer = StepTimer(args.warmup)
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            precision="bf16-mixed" if device.type == "cuda" else "32-true",
            max_epochs=1,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
        )
        trainer.fit(module, datamodule=data)
        return (timer.end - timer.start) / timer.steps


def time_topk(args, device) -> None:
    """The selection alone: ``torch.topk`` (on a GPU the selection costs more than the
    encoder's matmul)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pre = torch.randn(args.batch, args.latents, device=device, dtype=dtype)
    runs = {"torch.topk": lambda: pre.topk(args.k, dim=-1, sorted=False)}
    print("top-k selection alone:")
    for name, run in runs.items():
        run()
        sync(device)
        start = time.perf_counter()
        for _ in range(10):
            run()
        sync(device)
        print(f"  {name:<22} {(time.perf_counter() - start) / 10 * 1e3:8.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--latents", type=int, default=24576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--lightning", action="store_true", help="also time Trainer.fit")
    parser.add_argument("--dead", type=float, default=0.0, help="fraction of latents dead (AuxK)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.backends.cuda.matmul.allow_tf32 = True

    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(args.batch, args.d, generator=generator).to(device)
        for _ in range(args.warmup + args.steps)
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"device: {device.type} ({name or platform.machine()}), {os.cpu_count()} cores visible, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    print(
        f"TopK SAE d={args.d}, {args.latents} latents, k={args.k}, batch {args.batch}, "
        f"{args.steps} timed steps after {args.warmup}, best of {args.repeats}; "
        f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}; dead fraction {args.dead}"
    )

    with torch.no_grad():  # the sparse step computes the dense step's loss
        torch.manual_seed(0)
        check = TopKSAE(args.d, args.latents, args.k).to(device)
        sparse_loss = check(batches[0]).loss
        check.sparse_kernels = False
        dense_loss = check(batches[0]).loss
    print(f"first-batch loss, sparse vs dense: {sparse_loss.item():.6f} vs {dense_loss.item():.6f}")

    sides = {
        "plain": lambda: plain_side(args, device, batches),
        "hsae dense": lambda: hsae_side(args, device, sparse=False),
        "hsae": lambda: hsae_side(args, device, sparse=True),
    }
    if device.type == "cuda":
        sides["hsae triton"] = lambda: hsae_side(args, device, sparse=True, triton=True)
    if args.compile:
        sides["hsae compiled"] = lambda: hsae_side(args, device, sparse=True, compile=True)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    memory: dict[str, float] = {}
    for _ in range(args.repeats):
        for side, make in sides.items():
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            seconds[side].append(time_side(make(), batches, args.warmup, device))
            if device.type == "cuda":
                memory[side] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.lightning:
        seconds["lightning"] = [
            lightning_side(args, device, args.warmup + args.steps) for _ in range(args.repeats)
        ]
    time_topk(args, device)
    plain = min(seconds["plain"])
    print(f"{'side':<15} {'tokens/s':>12} {'ms/step':>9} {'x plain':>8} {'peak GPU GiB':>13}")
    for side, runs in seconds.items():
        best = min(runs)
        peak = f"{memory[side]:13.2f}" if side in memory else f"{'-':>13}"
        print(f"{side:<15} {args.batch / best:12,.0f} {best * 1e3:9.1f} {plain / best:8.2f} {peak}")


if __name__ == "__main__":
    main()
