"""Sparse kernels for the TopK family: a training step whose only dense product is the
encoder's forward matmul.

A TopK SAE's step in plain PyTorch is five dense ``[rows x n_latents]`` products: the
encoder's forward and weight gradient, the decoder's forward and weight gradient, and the
gradient of the codes. But each row has only ``k`` active latents, so four of them are
sparse in truth:

- decoding is a weighted sum of ``k`` decoder rows per input row (``sparse_decode``, an
  ``embedding_bag``); its gradients are ``k`` dot products per row (for the values) and
  ``k`` scaled copies of the output gradient added into the active rows (for the weights);
- the gradient reaching the pre-activations is zero off the active latents, so the
  encoder's weight and bias gradients are scatter-adds over the active latents too
  (``gathered_pre_acts``).

Both are ``torch.autograd.Function``s whose results equal the dense computation up to
float rounding (``tests/test_sae_sparse.py`` checks the forward and every gradient against
dense autograd). They run on any device with plain tensor ops; the ``[rows x k x d]``
intermediates are built in chunks of at most ``CHUNK_ELEMENTS`` to bound memory. On a GPU,
``HSAE_TRITON=1`` swaps in Triton kernels for the two backward products (``USE_TRITON``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 25
"""Largest ``rows x k x d`` intermediate built at once (128 MiB in float32)."""

USE_TRITON = os.environ.get("HSAE_TRITON", "0") == "1"
"""On CUDA tensors, compute ``row_dots`` and ``scatter_rows`` with the Triton kernels of
``hsae.sae.triton_kernels`` (no ``rows x k x d`` intermediates, deterministic). Opt-in
(``HSAE_TRITON=1``) until they are measured on a GPU: they are checked against these
helpers in Triton's interpreter, not yet timed."""


def _triton(*tensors: torch.Tensor):
    """The Triton kernels module when they should serve these tensors, else None."""
    if not (USE_TRITON and tensors[0].is_cuda):
        return None
    from hsae.sae import triton_kernels

    return triton_kernels if triton_kernels.available() else None


def _row_chunks(n_rows: int, k: int, d: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, k * d))
    return [slice(start, start + step) for start in range(0, n_rows, step)]


def row_dots(
    rows_nd: torch.Tensor, indices_na: torch.Tensor, table_kd: torch.Tensor
) -> torch.Tensor:
    """``out[n, j] = <rows[n], table[indices[n, j]]>``: the gradient of a sparse decode's
    values, without the dense ``rows @ table.T``."""
    kernels = _triton(rows_nd, indices_na, table_kd)
    if kernels is not None:
        return kernels.row_dots_triton(rows_nd, indices_na, table_kd)
    n, k = indices_na.shape
    out = torch.empty(n, k, dtype=table_kd.dtype, device=table_kd.device)
    rows = rows_nd.to(table_kd.dtype)
    for part in _row_chunks(n, k, table_kd.shape[1]):
        picked = F.embedding(indices_na[part], table_kd)  # [c, k, d]
        out[part] = torch.bmm(picked, rows[part, :, None]).squeeze(-1)
    return out


def _accumulator(*tensors: torch.Tensor) -> torch.dtype:
    """Sums run in float32 at least (bf16 gradients lose low bits when added up)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def scatter_rows(
    values_na: torch.Tensor, indices_na: torch.Tensor, rows_nd: torch.Tensor, n_out: int
) -> torch.Tensor:
    """``out[l] = sum over (n, j) with indices[n, j] = l of values[n, j] * rows[n]``: the
    ``[n_out, d]`` product ``S.T @ rows`` of the sparse matrix ``S`` that ``values`` and
    ``indices`` describe, as a weight gradient."""
    kernels = _triton(rows_nd, indices_na, values_na)
    if kernels is not None:
        return kernels.scatter_rows_triton(values_na, indices_na, rows_nd, n_out)
    n, k = indices_na.shape
    d = rows_nd.shape[1]
    dtype = _accumulator(values_na, rows_nd)
    out = torch.zeros(n_out, d, dtype=dtype, device=rows_nd.device)
    rows, values = rows_nd.to(dtype), values_na.to(dtype)
    for part in _row_chunks(n, k, d):
        products = values[part, :, None] * rows[part, None, :]  # [c, k, d]
        out.index_add_(0, indices_na[part].reshape(-1), products.reshape(-1, d))
    return out


def scatter_values(values_na: torch.Tensor, indices_na: torch.Tensor, n_out: int) -> torch.Tensor:
    """``out[l] = sum of values[n, j] over indices[n, j] = l`` (a bias gradient)."""
    dtype = _accumulator(values_na)
    out = torch.zeros(n_out, dtype=dtype, device=values_na.device)
    return out.index_add_(0, indices_na.reshape(-1), values_na.reshape(-1).to(dtype))


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, values_na: torch.Tensor, indices_na: torch.Tensor, table_kd: torch.Tensor
    ):
        values = values_na.to(table_kd.dtype)
        ctx.save_for_backward(values, indices_na, table_kd)
        return F.embedding_bag(indices_na, table_kd, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad_nd: torch.Tensor):
        values, indices, table = ctx.saved_tensors
        grad_values = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_values = row_dots(grad_nd, indices, table)
        if ctx.needs_input_grad[2]:
            grad_table = scatter_rows(values, indices, grad_nd, table.shape[0]).to(table.dtype)
        return grad_values, None, grad_table


def sparse_decode(
    values_na: torch.Tensor, indices_na: torch.Tensor, table_kd: torch.Tensor
) -> torch.Tensor:
    """``[n, d]``: row ``n`` is ``sum_j values[n, j] * table[indices[n, j]]``, i.e. ``codes @
    table`` for codes that are zero off ``indices``; differentiable in ``values`` and
    ``table`` at the cost of the ``n x k`` active entries only."""
    return _SparseDecode.apply(values_na, indices_na, table_kd)


class _GatheredPreActs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x_nd: torch.Tensor,
        b_pre: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        indices_na: torch.Tensor,
        pre_nk: torch.Tensor,
    ):
        ctx.save_for_backward(x_nd, b_pre, W_enc, indices_na)
        ctx.b_enc_dtype = b_enc.dtype
        return pre_nk.gather(-1, indices_na)

    @staticmethod
    def backward(ctx: Any, grad_na: torch.Tensor):
        x, b_pre, W_enc, indices = ctx.saved_tensors
        n_latents = W_enc.shape[1]
        grad_x = grad_b_pre = grad_W = grad_b_enc = None
        # d pre[n, l] / d b_enc[l] = 1, so the bias gradient is each latent's summed gradient.
        column_sums = scatter_values(grad_na, indices, n_latents)
        if ctx.needs_input_grad[3]:
            grad_b_enc = column_sums.to(ctx.b_enc_dtype)
        if ctx.needs_input_grad[2]:
            centred = x.to(column_sums.dtype) - b_pre.to(column_sums.dtype)
            grad_W = scatter_rows(grad_na, indices, centred, n_latents).T.contiguous()
            grad_W = grad_W.to(W_enc.dtype)
        if ctx.needs_input_grad[1]:
            grad_b_pre = -(W_enc.to(column_sums.dtype) @ column_sums).to(b_pre.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = sparse_decode(grad_na, indices, W_enc.T.contiguous()).to(x.dtype)
        return grad_x, grad_b_pre, grad_W, grad_b_enc, None, None


def gathered_pre_acts(
    x_nd: torch.Tensor,
    b_pre: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    indices_na: torch.Tensor,
    pre_nk: torch.Tensor,
) -> torch.Tensor:
    """``pre_nk.gather(-1, indices)`` where ``pre_nk = (x - b_pre) @ W_enc + b_enc`` was
    computed without autograd: the gradient flows to ``x``, ``b_pre``, ``W_enc`` and
    ``b_enc`` as if through the dense product, but touches only the gathered entries."""
    return _GatheredPreActs.apply(x_nd, b_pre, W_enc, b_enc, indices_na, pre_nk)


def batch_topk_indices(pre_nk: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK's selection (the ``k * n`` largest ReLU'd entries of the batch, as
    ``hsae.sae.base.batch_topk_codes``) as per-row indices ``[n, a]`` padded to the widest
    row's count ``w``, with a mask of the real entries (padding: index 0, mask False)."""
    n, width = pre_nk.shape
    flat = pre_nk.relu().flatten().topk(min(k * n, pre_nk.numel()), sorted=False).indices
    rows, cols = flat // width, flat % width
    order = rows.argsort(stable=True)
    rows, cols = rows[order], cols[order]
    counts = torch.bincount(rows, minlength=n)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(len(rows), device=pre_nk.device) - starts[rows]
    widest = int(counts.max())
    indices = torch.zeros(n, widest, dtype=torch.long, device=pre_nk.device)
    mask = torch.zeros(n, widest, dtype=torch.bool, device=pre_nk.device)
    indices[rows, slot] = cols
    mask[rows, slot] = True
    return indices, mask
