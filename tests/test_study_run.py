"""The smoke study end to end, in process: stand-ins trained (tiny recipe), step 1, SAE
banks, step 3, comparison, verdict, report, W&B compare run; then a rerun that trains and
evaluates nothing and writes the same report numbers."""

from __future__ import annotations

import json

import pytest

from tests.test_study_report import report_numbers_match

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_smoke_study_end_to_end_and_rerun_reuses(compose, tmp_path, monkeypatch):
    from hsae.study.run import RESULTS, run_study

    monkeypatch.setenv("HSAE_HOME", str(tmp_path / "home"))  # stand-ins trained here, cold
    cfg = compose(["study=smoke", f"cache.dir={tmp_path / 'cache'}", "logger=wandb"])
    out = tmp_path / "study"
    first = run_study(cfg, out)

    assert first["work"]["bank_jobs_trained"] == first["work"]["bank_jobs"] == 4
    assert first["work"]["saes_evaluated"] == len(first["saes"]) == 8
    assert len(first["stand_ins"]) == 4 and len(first["step1"]) == 4
    layer = first["verdict"]["layers"][0]
    assert isinstance(layer["precondition"]["holds"], bool)
    statuses = {f["family"]: f["status"] for f in layer["families"]}
    assert statuses["naming"] == "not applicable"  # stand-ins have no text tower
    for family in ("quality", "hierarchy", "monosemanticity", "absorption", "probing", "control"):
        assert statuses[family] != "not applicable", (family, statuses)
    for sae in first["saes"]:
        assert (out / sae["run_dir"]).joinpath("eval.json").exists()
        assert len(sae["halves"]) == 2 and "interp/purity@mean" in sae["halves"][0]
        assert sae["metrics"]["l0"] == pytest.approx(sae["k"])  # TopK: matched L0 = k
    report = out / "report.md"
    assert report_numbers_match(report, out / RESULTS) == []
    assert "## Verdict" in report.read_text()
    # The feature browser: one page per kind and the side-by-side page, linked from the report.
    browser = first["browser"]
    assert (out / browser["index"]).is_file()
    for label, run_dir in browser["saes"].items():
        assert (out / "browser" / label / "index.html").is_file()
        assert f"({browser['index']})" in report.read_text()
        rec = next(s for s in first["saes"] if s["run_dir"] == run_dir)
        assert (rec["kind"], rec["k"]) == (label, browser["k"])
    compare_runs = list((out / "wandb").glob("offline-run-*"))
    assert compare_runs, "no W&B compare run"
    wandb_files = list(compare_runs[0].glob("*.wandb"))
    assert wandb_files and b"compare" in wandb_files[0].read_bytes()

    text_before = report.read_text()
    second = run_study(cfg, out)
    assert second["work"]["bank_jobs_trained"] == 0
    assert second["work"]["saes_evaluated"] == 0
    assert json.dumps(second["verdict"], sort_keys=True) == json.dumps(
        first["verdict"], sort_keys=True
    )
    # Same numbers, except this run's own counts and timings.
    strip = lambda t: [ln for ln in t.splitlines() if not ln.startswith(("Size:", "Timing"))]  # noqa: E731
    assert strip(report.read_text()) == strip(text_before)
