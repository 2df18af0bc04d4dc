"""ViT vs CAST stand-ins at smoke size (study=smoke_cast, in process): step 1 measures the
part-whole hierarchy of the CAST units and says why the ViT units have none; the
precondition is CAST's part-whole structure against chance; the report shows both."""

from __future__ import annotations

import pytest

from hsae.metrics.part_whole import PART_WHOLE_KEYS
from tests.test_study_report import report_numbers_match

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_cast_study_reports_part_whole_and_its_precondition(compose, tmp_path, monkeypatch):
    from hsae.study.run import RESULTS, run_study

    monkeypatch.setenv("HSAE_HOME", str(tmp_path / "home"))
    cfg = compose(["study=smoke_cast", f"cache.dir={tmp_path / 'cache'}", "logger=wandb"])
    out = tmp_path / "study"
    results = run_study(cfg, out)

    units = {u["name"]: u for u in results["units"]}
    assert {u["kind"] for u in units.values()} == {"vit", "cast"}
    for name, record in results["step1"].items():
        metrics = record["metrics"]
        if units[name]["kind"] == "cast":
            assert all(metrics[k] is not None for k in PART_WHOLE_KEYS), name
            assert metrics["part_whole/nesting"] == 1.0
            assert len(record["halves"]) == 2
            assert record["halves"][0]["part_whole/part_iou"] is not None
        else:  # present, empty, with the reason
            assert all(metrics[k] is None for k in PART_WHOLE_KEYS), name
            assert all("segment tree" in record["skipped"][k] for k in PART_WHOLE_KEYS)
    pre = results["verdict"]["layers"][0]["precondition"]
    assert pre["metric"] == "part_whole/part_iou_over_chance"
    assert pre["against_chance"] == 0.0 and pre["effect"] is not None
    assert isinstance(pre["holds"], bool)
    text = (out / "report.md").read_text()
    assert "Part-whole hierarchy inside each image" in text
    assert "against its chance level" in text
    assert "builds no segment tree" in text
    assert report_numbers_match(out / "report.md", out / RESULTS) == []
    # The W&B compare run holds every unit's step-1 metrics, part_whole/* included.
    (run,) = (out / "wandb").glob("offline-run-*")
    logged = b"".join(p.read_bytes() for p in run.glob("*.wandb"))
    assert b"study/step1" in logged and b"part_whole/part_iou" in logged
