"""The Triton kernels equal the torch helpers they replace (``hsae.sae.sparse.row_dots`` and
``scatter_rows``): in Triton's interpreter on small CPU cases, and compiled on a GPU at a
realistic size when one is present."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from hsae.sae.sparse import row_dots, scatter_rows

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# Small blocks make every loop run several times with a masked tail (d=40 over blocks of
# 16, k=5 over blocks of 4, segments of a few entries over blocks of 2); None: the defaults.
SMALL_BLOCKS = {"block_k": 4, "block_d": 16, "block_p": 2}
DEFAULT_BLOCKS = {"block_k": None, "block_d": None, "block_p": None}


def make_case(
    dtype: torch.dtype, n: int, k: int, d: int, n_out: int, seed: int, n_padding: int = 1
) -> dict[str, torch.Tensor]:
    """Random rows, table, indices and values, with the traits of a real batch: latents
    repeated across rows, the last ``n_out // 4`` latents never used, and the last
    ``n_padding`` slots of each row padding (index 0, value 0) as in BatchTopK."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, n_out - n_out // 4, (n, k), generator=g)
    values = torch.randn(n, k, generator=g)
    indices[:, k - n_padding :] = 0
    values[:, k - n_padding :] = 0
    return {
        "rows": torch.randn(n, d, generator=g).to(dtype),
        "table": torch.randn(n_out, d, generator=g).to(dtype),
        "indices": indices,
        "values": values.to(dtype),
    }


def check_against_helpers(case: dict[str, torch.Tensor], n_out: int, blocks: dict) -> None:
    """Both kernels against the torch helpers; raises AssertionError on a mismatch."""
    from hsae.sae.triton_kernels import row_dots_triton, scatter_rows_triton

    rows, table, indices, values = case["rows"], case["table"], case["indices"], case["values"]
    low_precision = torch.bfloat16 in (rows.dtype, table.dtype, values.dtype)

    dots = row_dots_triton(
        rows, indices, table, block_k=blocks["block_k"], block_d=blocks["block_d"]
    )
    assert dots.dtype == table.dtype, f"row_dots dtype {dots.dtype}, table {table.dtype}"
    assert dots.device == table.device
    if low_precision:
        # The kernel sums in float32 and rounds once: within half a bfloat16 step of the
        # helper's sum on the same values upcast, or a whole step in the interpreter, whose
        # float32 -> bfloat16 cast truncates (triton 3.8) where the GPU's rounds to nearest.
        step = 2**-7 if os.environ.get("TRITON_INTERPRET") == "1" else 2**-8
        expected = row_dots(rows.float(), indices, table.float())
        torch.testing.assert_close(dots.float(), expected, rtol=step, atol=1e-4)
    else:
        # Kernel and helper (cuBLAS on a GPU) add the d products in different orders, so they
        # differ by rounding that grows with sum |x_i y_i| (up to ~1.5e-5 at d = 768 on an
        # H200, beyond assert_close's float32 default): both against the float64 sum, within
        # 16 ulps of that scale. A wrong index or a dropped block is off by O(|x||y|).
        exact = row_dots(rows.double(), indices, table.double())
        scale = row_dots(rows.double().abs(), indices, table.double().abs())
        bound = 16 * torch.finfo(rows.dtype).eps * scale + 1e-30
        for name, got in (("kernel", dots), ("helper", row_dots(rows, indices, table))):
            excess = ((got.double() - exact).abs() / bound).max().item()
            assert excess <= 1, f"row_dots ({name}) off by {excess:.2f}x the rounding bound"

    scattered = scatter_rows_triton(
        values, indices, rows, n_out, block_p=blocks["block_p"], block_d=blocks["block_d"]
    )
    expected = scatter_rows(values, indices, rows, n_out)
    assert scattered.dtype == expected.dtype, f"scatter_rows dtype {scattered.dtype}"
    assert scattered.device == rows.device
    # Products of bfloat16 inputs are exact in float32, so only the order of the sums differs.
    torch.testing.assert_close(scattered, expected)
    unused = torch.ones(n_out, dtype=torch.bool, device=indices.device)
    unused[indices[values != 0]] = False
    assert unused.any(), "the case should leave some latents unused"
    assert (scattered[unused] == 0).all(), "rows of latents that never occur must be zero"


def _case_float32() -> None:
    check_against_helpers(make_case(torch.float32, 7, 5, 40, 16, seed=0), 16, SMALL_BLOCKS)


def _case_bfloat16() -> None:
    check_against_helpers(make_case(torch.bfloat16, 7, 5, 40, 16, seed=1), 16, SMALL_BLOCKS)


def _case_float64() -> None:
    check_against_helpers(make_case(torch.float64, 6, 3, 24, 12, seed=2), 12, SMALL_BLOCKS)


def _case_default_blocks() -> None:
    check_against_helpers(make_case(torch.float32, 9, 5, 40, 16, seed=3), 16, DEFAULT_BLOCKS)


def _case_batch_topk_padding() -> None:
    # Half of each row is padding, so latent 0 gets many zero-valued entries.
    case = make_case(torch.float32, 8, 6, 24, 20, seed=4, n_padding=3)
    check_against_helpers(case, 20, SMALL_BLOCKS)


def _case_repeats_within_rows() -> None:
    case = make_case(torch.float32, 6, 5, 24, 8, seed=5, n_padding=0)
    case["indices"][:, 1] = case["indices"][:, 0]  # the same latent twice in each row
    check_against_helpers(case, 8, SMALL_BLOCKS)


def _case_non_contiguous_mixed() -> None:
    """Transposed and strided inputs, int32 indices, bfloat16 rows with float32 table and
    values (``row_dots`` in float32, ``scatter_rows`` in float32)."""
    base = make_case(torch.float32, 7, 5, 40, 16, seed=6)
    wide_indices = torch.stack([base["indices"], base["indices"]], dim=-1).flatten(1)
    case = {
        "rows": base["rows"].to(torch.bfloat16).T.contiguous().T,
        "table": base["table"].T.contiguous().T,
        "indices": wide_indices.to(torch.int32)[:, ::2],
        "values": base["values"].T.contiguous().T,
    }
    assert not any(t.is_contiguous() for t in case.values())
    check_against_helpers(case, 16, SMALL_BLOCKS)


INTERPRETER_CASES = {
    name.removeprefix("_case_"): fn for name, fn in globals().items() if name.startswith("_case_")
}


def interpreter_report() -> dict[str, str | None]:
    """Each interpreter case's failure (None if it passed). Runs in a subprocess started
    with ``TRITON_INTERPRET=1``, which must be set before the kernels are decorated."""
    from hsae.sae.triton_kernels import available

    report: dict[str, str | None] = {"available": None if available() else "available() False"}
    for name, fn in INTERPRETER_CASES.items():
        try:
            fn()
            report[name] = None
        except AssertionError as error:  # other errors fail the whole subprocess
            report[name] = "".join(traceback.format_exception(error)[-3:])
    return report


@pytest.fixture(scope="module")
def interpreted():
    code = "import json, tests.test_sae_triton as t; print(json.dumps(t.interpreter_report()))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("name", ["available", *INTERPRETER_CASES])
def test_interpreted_kernels_match_torch_helpers(interpreted, name):
    assert interpreted[name] is None, interpreted[name]


def test_imports_and_reports_unavailable_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    path = ROOT / "hsae" / "sae" / "triton_kernels.py"
    spec = importlib.util.spec_from_file_location("triton_kernels_without_triton", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.available() is False
    case = make_case(torch.float32, 3, 2, 4, 6, seed=7)
    with pytest.raises(RuntimeError, match="triton"):
        module.row_dots_triton(case["rows"], case["indices"], case["table"])


@needs_triton
def test_block_sizes_must_be_powers_of_two():
    from hsae.sae.triton_kernels import row_dots_triton, scatter_rows_triton

    case = make_case(torch.float32, 3, 2, 4, 6, seed=8)
    with pytest.raises(ValueError, match="block_d=48"):
        row_dots_triton(case["rows"], case["indices"], case["table"], block_d=48)
    with pytest.raises(ValueError, match="block_p=3"):
        scatter_rows_triton(case["values"], case["indices"], case["rows"], 6, block_p=3)


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")
def test_cpu_tensors_need_the_interpreter():
    from hsae.sae.triton_kernels import row_dots_triton

    case = make_case(torch.float32, 3, 2, 4, 6, seed=9)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        row_dots_triton(case["rows"], case["indices"], case["table"])


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")
@pytest.mark.parametrize(
    ("dtype", "k", "n_padding"),
    [(torch.float32, 32, 0), (torch.bfloat16, 32, 0), (torch.float32, 96, 64)],
    ids=["float32", "bfloat16", "batch_topk_padded"],
)
def test_compiled_kernels_match_torch_helpers_on_gpu(dtype, k, n_padding, monkeypatch):
    from hsae.sae.triton_kernels import scatter_rows_triton

    # The helper's bmm in full float32, even if an earlier test asked for TF32 matmuls.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)

    n, d, n_out = 4096, 768, 24576
    case = make_case(dtype, n, k, d, n_out, seed=10, n_padding=n_padding)
    case = {name: t.cuda() for name, t in case.items()}
    check_against_helpers(case, n_out, DEFAULT_BLOCKS)
    # No atomics: the weight gradient is the same, bit for bit, on every run.
    first = scatter_rows_triton(case["values"], case["indices"], case["rows"], n_out)
    second = scatter_rows_triton(case["values"], case["indices"], case["rows"], n_out)
    assert torch.equal(first, second)
