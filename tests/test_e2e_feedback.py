"""End to end on the embedded models (SmolLM2-135M in llama.cpp, all-MiniLM-L6-v2): tune with the default
probe mix, review, a script fills in three edits and ratings, feedback, a second tune whose probes carry
the three human references, and calibrate on the ratings and the (original, edited) pairs, with --align.
Run under ``flock /tmp/llama.lock``."""

import csv
import io
import json

import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from conftest import ROOT
from selftune.cli import app
from selftune.demo_corpus import materialize

pytestmark = pytest.mark.e2e
TOPICS = ["assert", "pass", "break", "continue", "del", "return", "global", "raise"]


def test_tune_review_feedback_tune_calibrate(tmp_path):
    assert materialize(tmp_path / "docs", TOPICS) == len(TOPICS)
    cfg = yaml.safe_load((ROOT / "configs/rag.yaml").read_text())
    cfg.update(workdir=str(tmp_path / "work"), rubric=str(ROOT / "configs/rubrics/taste.yaml"),
               corpus={"path": str(tmp_path / "docs")})
    cfg["probes"] = {**cfg["probes"], "count": 12, "file": None}
    cfg["sut"]["params"]["chunk_size"] = {"type": "choice", "choices": [300, 500], "initial": 500}
    cfg["optimizer"]["rounds"] = 1
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = CliRunner()

    first = run.invoke(app, ["tune", str(path)], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "## Scores per probe kind" in first.output and "- cross-split check:" in first.output
    assert "- coverage (of 8 documents" in first.output and "- probes with a human reference: 0" in first.output

    review = tmp_path / "review.csv"
    r = run.invoke(app, ["review", str(path), "--worst", "6", "--out", str(review)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(review.read_text(encoding="utf-8-sig"))))
    assert len(rows) >= 3
    for i, row in enumerate(rows[:3]):  # a person's three corrections and ratings
        row["edited_answer"] = f"Corrected by a person ({i}): {row['reference'] or 'the corpus does not say.'}"
        row["rating_grounded"] = str(1 + i)
        row["comment"] = "checked against the manual"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    filled = tmp_path / "filled.csv"
    filled.write_text(buf.getvalue(), encoding="utf-8")
    r = run.invoke(app, ["feedback", str(path), "--file", str(filled)], catch_exceptions=False)
    assert r.exit_code == 0 and "3 edited answers" in r.output, r.output

    second = run.invoke(app, ["tune", str(path)], catch_exceptions=False)
    assert second.exit_code == 0, second.output
    assert "- probes with a human reference: 3 (3 from `selftune feedback`)" in second.output
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("selftune")
    last = client.search_runs([exp.experiment_id], filter_string="tags.`selftune.kind` = 'tune'",
                              order_by=["attribute.start_time DESC"])[0]
    assert last.data.metrics["stats/probes_human_reference"] == 3
    edited = {row["probe_id"]: row["edited_answer"] for row in rows[:3]}
    probes = [json.loads(line) for s in ("train", "val", "test") for line in
              open(client.download_artifacts(last.info.run_id, f"probes/{s}.jsonl")).read().splitlines()]
    carried = {p["id"]: p for p in probes if p["reference_origin"] == "human"}
    assert {k: carried[k]["reference"] for k in edited} == edited

    out = tmp_path / "agreement.json"
    r = run.invoke(app, ["calibrate", "--rubric", str(ROOT / "configs/rubrics/taste.yaml"), "--config", str(path),
                         "--feedback", "--align", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got = json.loads(out.read_text())
    assert got["feedback_items"] == 3 and got["n"] == 3
    assert got["all"]["grounded"]["n"] + got["all"]["grounded"]["invalid"] == 3
    assert sorted(i["labels"]["grounded"] for i in got["items"]) == [1, 2, 3]
    # the three (original, edited) pairs: how often the judge prefers the person's edit, and --align's
    # examples from the pairs of its fit part the judge got wrong (the edit at the top of the scale)
    assert got["feedback_pairs"] == 3
    pairs = got["pairs"]["grounded"]
    assert pairs["n"] + pairs["invalid"] == 3 and pairs["prefers_edit"] + pairs["ties"] + pairs["prefers_original"] \
        == pairs["n"]
    assert {i["edited"] for i in got["pair_items"]} == set(edited.values())
    al = got["align"]
    assert al["pairs_fit"] + al["pairs_held_out"] == 3 and al["pairs_after"]["grounded"]["n"] \
        + al["pairs_after"]["grounded"]["invalid"] == al["pairs_held_out"]
    from_pairs = [e for e in al["examples"]["grounded"] if e["why"].startswith("a person's correction")]
    assert len(from_pairs) == min(2, al["pairs_wrong_in_fit"]["grounded"])
    assert all(e["score"] == 5 and e["answer"] in {v[:300] for v in edited.values()} for e in from_pairs)
    assert "does the judge prefer the edit?" in r.output
    cal = client.search_runs([exp.experiment_id], filter_string="tags.`selftune.kind` = 'calibrate'")[0]
    assert "pairs/grounded/n" in cal.data.metrics and "align/pairs_after/grounded/n" in cal.data.metrics
