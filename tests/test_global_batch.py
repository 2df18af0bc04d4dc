"""Under DDP, ``global_batch`` makes each rank's loss its exact share of the single-process
loss: the ranks' averaged gradients equal one process's gradients on the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hsae.sae import make_sae
from hsae.sae.base import global_batch

SPECS = {
    "topk": dict(arch="topk", d_model=12, n_latents=48, k=4, k_aux=6, dead_tokens_threshold=40),
    "relu": dict(arch="relu", d_model=12, n_latents=48),
    "matryoshka_topk": dict(
        arch="matryoshka",
        d_model=12,
        n_latents=48,
        k=4,
        activation="topk",
        dead_tokens_threshold=40,
    ),
}


def _sae(name: str):
    torch.manual_seed(0)
    sae = make_sae(**SPECS[name]).double().train()
    if hasattr(sae, "rows_since_fired"):
        sae.rows_since_fired[::4] = 1000  # some latents dead: AuxK runs
    return sae


def _batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    # Halves with different spreads, so per-rank statistics differ from the global ones.
    x = torch.randn(32, 12, generator=generator, dtype=torch.float64)
    return x * torch.cat([torch.full((16, 1), 0.5), torch.full((16, 1), 3.0)]).double() + 1


def _rank(rank: int, world: int, init_file: str, name: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sae = _sae(name)
        share = _batch().chunk(world)[rank]
        with global_batch():
            out = sae(share)
        out.loss.backward()
        grads = [p.grad.clone() for p in sae.parameters()]
        for g in grads:  # what DDP does: the average over ranks
            dist.all_reduce(g)
            g /= world
        buffers = {k: v.clone() for k, v in sae.named_buffers()}
        if rank == 0:
            queue.put(([g.numpy() for g in grads], {k: v.numpy() for k, v in buffers.items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_two_ranks_equal_one_process(name, tmp_path):
    context = mp.get_context("spawn")
    queue = context.Queue()
    procs = [
        context.Process(target=_rank, args=(r, 2, str(tmp_path / "init"), name, queue))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    grads, buffers = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    one = _sae(name)
    one(_batch()).loss.backward()
    for (param, p), g in zip(one.named_parameters(), grads, strict=True):
        torch.testing.assert_close(torch.from_numpy(g), p.grad, msg=param)
    for key, value in one.named_buffers():
        torch.testing.assert_close(torch.from_numpy(buffers[key]), value, msg=key)


def test_without_a_process_group_nothing_changes():
    sae, x = _sae("topk"), _batch()
    plain = sae(x).loss
    sae2 = _sae("topk")
    with global_batch():
        inside = sae2(x).loss
    assert torch.equal(plain, inside)
