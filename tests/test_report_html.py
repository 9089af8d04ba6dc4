"""report.html from hand-made records: what it shows, what it picks, what it escapes."""

import numpy as np

from selftune.loop import TuneResult
from selftune.records import Answer, Chunk, Evaluation, GateDecision, Judgment, Probe, Round, Score
from selftune.report_html import bootstrap_ci, plotted_stats, probe_pairs, word_diff, write_report

BASE = {"instructions": "Answer from the context.", "top_k": 2, "chunk_size": 200}
BEST = {"instructions": "Quote the context, then answer.", "top_k": 3, "chunk_size": 200}


def ev(split, values, params, text="answer"):
    js = []
    for i, v in enumerate(values):
        p = Probe(id=f"{split}{i}", question=f"Question {split} {i}?", reference=f"ref {i}", split=split)
        a = Answer(probe=p, text=text if i == 0 else f"answer {i}", seconds=1.0,
                   contexts=(Chunk(id=f"c{i}", doc="d.txt", start=0, end=9, text=f"context of item {i}"),))
        js.append(Judgment(answer=a, overall=v, scores={"correct": Score(value=v, raw=v, rationale=f"why {i}")}
                           if v is not None else {"correct": Score(status="invalid", rationale="no digit")}))
    return Evaluation(params=params, split=split, judgments=tuple(js))


def result(best_promoted=True):
    test_base = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, None]
    test_best = [0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.3, 0.1, 0.9]  # gains .4 .3 .2 .1 0, losses -.05 -.2 -.4
    r0 = Round(index=0, params=BASE, train=ev("train", [0.4, 0.5], BASE), val=ev("val", [0.4, 0.6, 0.5], BASE),
               gate=GateDecision(promote=True, reason="baseline"), incumbent_index=0,
               judge_stats={"retest/flip_rate": 0.1, "retest/n": 4.0, "length_corr/grounded": -0.3})
    r1 = Round(index=1, params=BEST, train=ev("train", [0.7, 0.8], BEST), val=ev("val", [0.7, 0.8, 0.9], BEST),
               gate=GateDecision(promote=best_promoted, reason="gain +0.3"), incumbent_index=1 if best_promoted else 0,
               judge_stats={"retest/flip_rate": 0.1, "retest/n": 4.0, "swap/consistency": 0.75})
    best = r1 if best_promoted else r0
    tb = ev("test", test_base, BASE, text="<script>alert(1)</script>")
    return TuneResult(rounds=[r0, r1], best=best, test_baseline=tb,
                      test_best=ev("test", test_best, BEST) if best_promoted else tb, stats={})


def test_report_writes_html_and_pngs(tmp_path):
    out = write_report(result(), "# selftune report\n- gain <b>\n", tmp_path / "report")
    for name in ("val_by_round.png", "criteria.png", "search_path.png", "judge_reliability.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    for heading in ("Validation score per round", "Per criterion: baseline vs best", "Search path",
                    "Judge reliability per round", "Instructions: baseline → best", "Held-out probes"):
        assert heading in page
    assert page.count("data:image/png;base64,") == 4  # self-contained: it opens from an MLflow artifact too
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "- gain &lt;b&gt;" in page and (out / "report.md").read_text().startswith("# selftune report")
    assert "★ promoted" in page and "Where the best beats the baseline (3 of 3)" in page
    assert "Where the best loses to the baseline (3 of 3)" in page
    assert "context of item 7" in page  # the biggest loss is shown with its context


def test_no_promotion_says_the_best_is_the_baseline(tmp_path):
    page = (write_report(result(best_promoted=False), "md", tmp_path) / "report.html").read_text()
    assert "No candidate was promoted" in page and "(unchanged)" in page


def test_probe_pairs_pick_the_largest_gains_and_losses_among_scored_items():
    r = result()
    wins, losses = probe_pairs(r.test_baseline, r.test_best)
    assert [round(d, 2) for d, _, _ in wins] == [0.4, 0.3, 0.2]
    assert [round(d, 2) for d, _, _ in losses] == [-0.4, -0.2, -0.05]
    assert all(a.answer.probe.id == b.answer.probe.id for _, a, b in wins + losses)
    assert "test8" not in {a.answer.probe.id for _, a, _ in wins}  # its baseline was invalid: not a pair


def test_bootstrap_interval_is_seeded_and_holds_the_mean():
    vals = [0.1, 0.4, 0.5, 0.9, 0.7]
    lo, hi = bootstrap_ci(vals)
    assert lo < np.mean(vals) < hi and bootstrap_ci(vals) == (lo, hi)
    assert bootstrap_ci([0.5]) is None


def test_word_diff_marks_and_escapes():
    d = word_diff("Answer from the context.", "Answer <b>only</b> from the context.")
    assert d == "Answer <ins>&lt;b&gt;only&lt;/b&gt;</ins> from the context."
    assert word_diff("a b c", "a c") == "a <del>b</del> c"


def test_reliability_plot_keeps_rates_and_drops_counts():
    assert plotted_stats(result().rounds) == ["length_corr/grounded", "retest/flip_rate", "swap/consistency"]


def test_figures_and_report_are_logged_to_the_run(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    eid = client.create_experiment("r", artifact_location=(tmp_path / "art").as_uri())
    rid = client.create_run(eid).info.run_id
    write_report(result(), "md", tmp_path / "out", client, rid)
    arts = {a.path for a in client.list_artifacts(rid)} | {a.path for a in client.list_artifacts(rid, "figures")}
    assert {"report.html", "figures/val_by_round.png", "figures/criteria.png", "figures/search_path.png",
            "figures/judge_reliability.png"} <= arts
