"""Triton versions of ``hsae.sae.sparse.row_dots`` and ``scatter_rows``: the two sparse
products in the backward pass of a TopK SAE step, with the same signatures and results.

- ``row_dots_triton(rows_nd, indices_na, table_kd)`` -> ``[n, a]``: ``out[n, j] = <rows[n],
  table[indices[n, j]]>`` (the gradient of a sparse decode's values). One program per (row,
  block of ``k``) gathers its table rows by index a block of ``d`` at a time and
  accumulates the dot products in float32.
- ``scatter_rows_triton(values_na, indices_na, rows_nd, n_out)`` -> ``[n_out, d]``:
  ``out[l] = sum over indices[n, j] = l of values[n, j] * rows[n]`` (a weight gradient).
  The flat indices are sorted (stably) on the device, which groups each output row's
  contributions into one segment; one program per (output row, block of ``d``) walks its
  segment in a fixed order and writes the sum, zero for an empty segment.

Why: the plain-torch helpers build ``[rows x k x d]`` intermediates (in chunks), so they
are bound by memory traffic on a GPU; these kernels read each input once and build
nothing of that size. ``scatter_rows_triton`` uses no atomics, so the weight gradients it
makes are bitwise reproducible from run to run (``index_add_`` on CUDA is not).

Their speed has not been measured on a GPU yet: ``bench/sae_step.py`` is where it will be;
the block sizes below are untuned guesses. ``tests/test_sae_triton.py`` checks both against
the torch helpers, in Triton's interpreter on the CPU and compiled on a GPU when present.

Triton is imported guardedly: this module imports without it, and ``available()`` says
whether the kernels can run here.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch helpers in hsae.sae.sparse serve without it
    triton = None

ROW_DOTS_BLOCK_K = 32
"""Largest block of a row's ``k`` indices that one ``row_dots`` program handles."""
BLOCK_D = 128
"""Columns of ``d`` loaded at once (a multiple of 32 lanes)."""
SCATTER_BLOCK_P = 8
"""Segment entries one ``scatter_rows`` step adds at once: a TopK batch of 4096 x 32 over
24,576 latents averages about 5 entries per latent."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """Whether the kernels can run here: Triton imports and a CUDA device is present, or
    Triton's interpreter is on (``TRITON_INTERPRET=1``, set before this module is imported),
    which runs them on CPU tensors."""
    return triton is not None and (torch.cuda.is_available() or _interpreting())


if triton is not None:

    @triton.jit
    def _row_dots_kernel(
        rows_ptr,
        indices_ptr,
        table_ptr,
        out_ptr,
        k,
        d,
        n_table,
        ACC: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        in_k = slots < k
        index = tl.load(indices_ptr + row * k + slots, mask=in_k, other=0)
        # Out-of-range indices read nothing (and give 0) rather than stray memory.
        valid = in_k & (index >= 0) & (index < n_table)
        acc = tl.zeros([BLOCK_K], dtype=ACC)
        for start in range(0, d, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            in_d = cols < d
            x = tl.load(rows_ptr + row * d + cols, mask=in_d, other=0).to(ACC)
            picked = tl.load(
                table_ptr + index[:, None] * d + cols[None, :],
                mask=valid[:, None] & in_d[None, :],
                other=0,
            ).to(ACC)
            acc += tl.sum(picked * x[None, :], axis=1)
        tl.store(out_ptr + row * k + slots, acc.to(out_ptr.dtype.element_ty), mask=in_k)

    @triton.jit
    def _scatter_rows_kernel(
        values_ptr,
        order_ptr,
        offsets_ptr,
        rows_ptr,
        out_ptr,
        k,
        d,
        ACC: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        latent = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_d = cols < d
        # Runtime bounds: segments differ in length, so nothing here is specialised on them.
        begin = tl.load(offsets_ptr + latent)
        end = tl.load(offsets_ptr + latent + 1)
        acc = tl.zeros([BLOCK_D], dtype=ACC)
        for start in range(begin, end, BLOCK_P):
            p = start + tl.arange(0, BLOCK_P)
            in_segment = p < end
            flat = tl.load(order_ptr + p, mask=in_segment, other=0)  # position in [n * k]
            value = tl.load(values_ptr + flat, mask=in_segment, other=0).to(ACC)
            rows = tl.load(
                rows_ptr + (flat // k)[:, None] * d + cols[None, :],
                mask=in_segment[:, None] & in_d[None, :],
                other=0,
            ).to(ACC)
            acc += tl.sum(value[:, None] * rows, axis=0)
        tl.store(out_ptr + latent * d + cols, acc.to(out_ptr.dtype.element_ty), mask=in_d)


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError(
            "hsae.sae.triton_kernels needs the triton package, which is not installed: "
            "use hsae.sae.sparse.row_dots / scatter_rows instead, or pip install triton"
        )


def _block(requested: int | None, default: int, extent: int, name: str) -> int:
    """A power of two: ``requested``, or ``extent`` rounded up to one and capped at
    ``default`` (no point in a block wider than what it covers)."""
    if requested is None:
        return min(default, triton.next_power_of_2(max(1, extent)))
    if requested < 1 or requested & (requested - 1):
        raise ValueError(f"{name}={requested}: must be a power of two (tl.arange needs one)")
    return requested


def _accumulator(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (as ``hsae.sae.sparse._accumulator``)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"floating inputs expected, got {[t.dtype for t in tensors]}")
    return dtype


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _device_of(*tensors: torch.Tensor) -> torch.device:
    """The one device of ``tensors``, checked to be one the kernels can run on."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"inputs must share one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"Triton kernels run on CUDA tensors, got {device} ones: move them to the GPU, use "
            "the torch helpers in hsae.sae.sparse, or set TRITON_INTERPRET=1 before importing "
            "this module (Triton's interpreter runs CPU tensors, slowly)"
        )
    return device


def _on(device: torch.device):
    """Launch on ``device``: Triton launches on the current CUDA device, not the tensors'."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_shapes(indices_na: torch.Tensor, rows_nd: torch.Tensor, other: str) -> None:
    if indices_na.dim() != 2 or rows_nd.dim() != 2 or indices_na.shape[0] != rows_nd.shape[0]:
        raise ValueError(
            f"indices [n, a] and rows [n, d] expected, got {tuple(indices_na.shape)} and "
            f"{tuple(rows_nd.shape)} ({other})"
        )
    if indices_na.dtype.is_floating_point or indices_na.dtype.is_complex:
        raise TypeError(f"indices must be integers, got {indices_na.dtype}")


def row_dots_triton(
    rows_nd: torch.Tensor,
    indices_na: torch.Tensor,
    table_kd: torch.Tensor,
    *,
    block_k: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """``out[n, j] = <rows[n], table[indices[n, j]]>`` as ``hsae.sae.sparse.row_dots``:
    ``[n, a]`` in ``table_kd``'s dtype, summed in float32 (float64 for float64 inputs).
    Indices must lie in ``[0, len(table_kd))``; one outside gives 0 instead of an error.
    ``block_k`` / ``block_d`` (powers of two) override the block sizes, for tests."""
    _require_triton()
    _check_shapes(indices_na, rows_nd, f"table {tuple(table_kd.shape)}")
    n, k = indices_na.shape
    d = rows_nd.shape[1]
    if table_kd.dim() != 2 or table_kd.shape[1] != d:
        raise ValueError(f"table [l, {d}] expected, got {tuple(table_kd.shape)}")
    acc = _accumulator(rows_nd, table_kd)
    bk = _block(block_k, ROW_DOTS_BLOCK_K, k, "block_k")
    bd = _block(block_d, BLOCK_D, d, "block_d")
    device = _device_of(rows_nd, indices_na, table_kd)
    out = torch.empty(n, k, dtype=table_kd.dtype, device=device)
    if n == 0 or k == 0:
        return out
    if d == 0:
        return out.zero_()
    with _on(device):
        _row_dots_kernel[(n, triton.cdiv(k, bk))](
            rows_nd.contiguous(),
            indices_na.to(torch.int64).contiguous(),
            table_kd.contiguous(),
            out,
            k,
            d,
            table_kd.shape[0],
            ACC=_tl_dtype(acc),
            BLOCK_K=bk,
            BLOCK_D=bd,
        )
    return out


def scatter_rows_triton(
    values_na: torch.Tensor,
    indices_na: torch.Tensor,
    rows_nd: torch.Tensor,
    n_out: int,
    *,
    block_p: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """``out[l] = sum over indices[n, j] = l of values[n, j] * rows[n]`` as
    ``hsae.sae.sparse.scatter_rows``: ``[n_out, d]`` in float32 (float64 for float64
    inputs), bitwise the same on every run. Entries whose value is 0 (BatchTopK's padding)
    are skipped, and so are indices outside ``[0, n_out)`` (the torch helper raises on
    those). ``block_p`` / ``block_d`` (powers of two) override the block sizes, for tests."""
    _require_triton()
    _check_shapes(indices_na, rows_nd, f"values {tuple(values_na.shape)}")
    if values_na.shape != indices_na.shape:
        raise ValueError(
            f"values and indices must have one shape, got {tuple(values_na.shape)} and "
            f"{tuple(indices_na.shape)}"
        )
    n, k = indices_na.shape
    d = rows_nd.shape[1]
    acc = _accumulator(values_na, rows_nd)
    bp = _block(block_p, SCATTER_BLOCK_P, n * k, "block_p")
    bd = _block(block_d, BLOCK_D, d, "block_d")
    device = _device_of(values_na, indices_na, rows_nd)
    # No zero fill: the kernel writes every output row, zero where its segment is empty.
    out = torch.empty(n_out, d, dtype=acc, device=device)
    if n_out == 0 or d == 0:
        return out
    values = values_na.contiguous().view(-1)
    # Zero-valued entries add nothing; sending them past the last segment keeps BatchTopK's
    # padding (all at index 0) from piling into one long serial segment for latent 0.
    flat = torch.where(values == 0, n_out, indices_na.to(torch.int64).reshape(-1))
    # Stable, so each segment is in the entries' own order on every run: a fixed order of
    # summation, hence bitwise-reproducible sums.
    sorted_flat, order = torch.sort(flat, stable=True)
    # Segment l is order[offsets[l]:offsets[l + 1]]. searchsorted rather than bincount +
    # cumsum: bincount on CUDA reads its output length back to the host, a sync per call.
    bounds = torch.arange(n_out + 1, dtype=torch.int64, device=device)
    offsets = torch.searchsorted(sorted_flat, bounds)
    with _on(device):
        _scatter_rows_kernel[(n_out, triton.cdiv(d, bd))](
            values,
            order,
            offsets,
            rows_nd.contiguous(),
            out,
            k,
            d,
            ACC=_tl_dtype(acc),
            BLOCK_P=bp,
            BLOCK_D=bd,
        )
    return out
