"""`selftune judge` / `selftune calibrate` on a fixture with a scripted judge; agreement by hand."""

import json
import re

import pytest
from typer.testing import CliRunner

from conftest import no_progress, ROOT, fake_role
from selftune import cli, runtime
from selftune.calibrate import agreement, align_examples, judge_all, read_items, split_for_alignment
from selftune.errors import InputError
from selftune.judge import Judge
from selftune.rubric import load_rubric
from selftune.runtime import JudgeRuntime, Tracking

RUBRIC = load_rubric(ROOT / "configs/rubrics/taste.yaml")
# human grounded labels and what the scripted judge will say (by answer text)
FIXTURE = [("a1", 5, 5), ("a2", 1, 1), ("a3", 3, 4), ("a4", 5, 5), ("a5", 1, 3), ("a6", 4, 4)]


# a person's edits: (original, what the judge says of it, edited, what the judge says of it)
PAIRS = [("o1", 4, "e1", 2), ("o2", 1, "e2", 5), ("o3", 3, "e3", 3), ("o4", 2, "e4", 4)]


def pairs():
    return [{"probe_id": f"p{i}", "question": "What does pass do?", "original": f"pass does nothing {o}",
             "edited": f"pass does nothing {e}", "contexts": ["pass does nothing"], "reference": "pass does nothing"}
            for i, (o, _, e, _) in enumerate(PAIRS)]


def rows():
    return [{"question": "What does pass do?", "answer": f"pass does nothing {a}", "contexts": ["pass does nothing"],
             "labels": {"grounded": h, "concise": "pass"}} for a, h, _ in FIXTURE]


def scripted():
    judged = {f"pass does nothing {a}": g for a, _, g in FIXTURE}
    judged.update({f"pass does nothing {a}": g for o, go, e, ge in PAIRS for a, g in ((o, go), (e, ge))})

    def script(m):
        answer = re.search(r"Answer to grade:\n<<(\S+)>>\n(.*)\n<</\1>>", m[-1]["content"], re.S).group(2)
        return json.dumps({"rationale": "scripted", "score": judged[answer]})
    return fake_role(script)


def test_agreement_matches_hand_computation():
    judge = Judge(RUBRIC, scripted())
    rs = rows()
    js = judge_all(judge, rs, no_progress)
    agg = agreement(RUBRIC, rs, js, seed=0, resamples=300)
    g = agg["grounded"]
    from sklearn.metrics import cohen_kappa_score
    from scipy.stats import spearmanr

    human = [h for _, h, _ in FIXTURE]
    judged = [j for _, _, j in FIXTURE]
    assert g["n"] == 6 and g["kind"] == "ordinal" and g["invalid"] == 0
    assert g["kappa"] == pytest.approx(cohen_kappa_score(human, judged, weights="quadratic", labels=[1, 2, 3, 4, 5]))
    assert g["spearman"] == pytest.approx(spearmanr(human, judged).statistic)
    assert g["exact_agreement"] == pytest.approx(4 / 6)
    # rows human 1..5, cols judge 1..5: (1,1) (1,3) (3,4) (4,4) (5,5)x2
    assert g["confusion"] == [[1, 0, 1, 0, 0], [0] * 5, [0, 0, 0, 1, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 2]]
    lo, hi = g["kappa_ci95"]
    assert lo <= g["kappa"] <= hi
    c = agg["concise"]  # a check labelled pass/fail: all 4-word answers pass the word bounds
    assert c["kind"] == "binary" and c["exact_agreement"] == 1.0


def test_align_uses_one_part_and_reports_on_the_other():
    fit, held = split_for_alignment(6, seed=0)
    assert sorted(fit + held) == list(range(6)) and not set(fit) & set(held)
    rs = rows()
    js = judge_all(Judge(RUBRIC, scripted()), rs, no_progress)
    aligned = align_examples(RUBRIC, [rs[i] for i in fit], [js[i] for i in fit], per_criterion=2)
    new = aligned.llm_criteria()[0].examples[len(RUBRIC.llm_criteria()[0].examples):]
    assert len(new) == 2 and all(e.answer in {rs[i]["answer"] for i in fit} for e in new)
    # the biggest miss in the fit part comes first, with the human's level
    misses = sorted(((abs(js[i].scores["grounded"].raw - rs[i]["labels"]["grounded"]), i) for i in fit), reverse=True)
    assert new[0].score == rs[misses[0][1]]["labels"]["grounded"]


def test_the_judge_against_a_persons_edits_and_the_pairs_it_gets_wrong_as_examples():
    from selftune.calibrate import judge_pairs, pair_agreement, pair_examples

    judged = judge_pairs(Judge(RUBRIC, scripted()), pairs(), no_progress)
    g = pair_agreement(RUBRIC, judged)["grounded"]
    # e2 > o2 and e4 > o4: the edit preferred twice; o3 = e3 a tie; o1 > e1 the original preferred
    assert (g["n"], g["prefers_edit"], g["ties"], g["prefers_original"]) == (4, 2, 1, 1)
    assert g["agreement"] == pytest.approx(0.5)
    aligned = pair_examples(RUBRIC, pairs(), judged, per_criterion=2)
    new = aligned.llm_criteria()[0].examples[len(RUBRIC.llm_criteria()[0].examples):]
    # the pairs it got wrong, biggest miss first (o1 4 vs e1 2, then the tie): the edit at the top, the
    # original at the judge's level below the top
    assert [(e.answer, e.score) for e in new] == [("pass does nothing e1", 5), ("pass does nothing o1", 4),
                                                  ("pass does nothing e3", 5), ("pass does nothing o3", 3)]
    assert pair_examples(RUBRIC, [pairs()[1]], [judged[1]]).llm_criteria()[0].examples == \
        RUBRIC.llm_criteria()[0].examples  # a pair it got right teaches nothing


def test_calibrate_feedback_uses_the_edit_pairs_and_align_learns_from_them(tmp_path, monkeypatch, corpus_dir):
    from mlflow import MlflowClient

    from conftest import write_config

    labels, rubric = cli_with(tmp_path, monkeypatch, scripted)
    config = write_config(tmp_path, corpus_dir)
    (tmp_path / "work" / "feedback").mkdir(parents=True)
    (tmp_path / "work" / "feedback" / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs()))
    out = tmp_path / "agreement.json"
    r = CliRunner().invoke(cli.app, ["calibrate", "--rubric", str(rubric), "--labels", str(labels), "--config",
                                     str(config), "--feedback", "--align", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["feedback_pairs"] == 4 and res["pairs"]["grounded"]["agreement"] == pytest.approx(0.5)
    assert "does the judge prefer the edit?" in r.output and "prefers the edit 2, ties 1" in r.output
    al = res["align"]
    assert al["pairs_fit"] + al["pairs_held_out"] == 4 and al["pairs_after"]["grounded"]["n"] == al["pairs_held_out"]
    shown = [e for e in al["examples"]["grounded"] if e["why"].startswith(("a person's correction", "the answer a"))]
    assert len(shown) == 2 * min(2, al["pairs_wrong_in_fit"]["grounded"]) and al["pairs_wrong_in_fit"]["grounded"]
    pfit, _ = split_for_alignment(4, seed=1)  # the pairs' split: seed + 1
    assert {e["answer"] for e in shown} <= {pairs()[i][k] for i in pfit for k in ("original", "edited")}
    run_id = re.search(r"MLflow run: (\w+)", r.output).group(1)
    m = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).data.metrics
    assert m["pairs/grounded/agreement"] == pytest.approx(0.5) and m["pairs/grounded/prefers_edit"] == 2
    assert "align/pairs_after/grounded/agreement" in m and "pairs/overall/n" in m
    # edits only (no labels, no ratings): the pairs alone are a calibration
    r = CliRunner().invoke(cli.app, ["calibrate", "--rubric", str(rubric), "--config", str(config), "--feedback"])
    assert r.exit_code == 0 and "prefers the edit 2" in r.output, r.output


def test_labels_are_validated_with_line_and_key(tmp_path):
    bad = tmp_path / "l.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a", "labels": {"grounded": 9}}) + "\n")
    with pytest.raises(InputError, match=r"line 1\.labels\.grounded: expected an integer in \[1, 5\]"):
        read_items(bad, RUBRIC, need_labels=True)
    bad.write_text(json.dumps({"question": "q", "answer": "a", "labels": {"tone": 3}}) + "\n")
    with pytest.raises(InputError, match=r"line 1\.labels\.tone: unknown criterion"):
        read_items(bad, RUBRIC, need_labels=True)
    bad.write_text(json.dumps({"question": "q", "answer": 3}) + "\n")
    with pytest.raises(InputError, match=r"line 1\.answer: expected a string"):
        read_items(bad)


def test_shipped_labels_validate():
    rs = read_items(ROOT / "datasets/labels/pyref-labels.jsonl", RUBRIC, need_labels=True)
    assert len(rs) >= 40


def cli_with(tmp_path, monkeypatch, judge_roles):
    """The fixture's labels and the shipped rubric in ``tmp_path``, and the CLI's judge set up from
    ``judge_roles()`` (scripted) instead of a model; returns (labels, rubric) paths."""
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    rubric = tmp_path / "r.yaml"
    rubric.write_text((ROOT / "configs/rubrics/taste.yaml").read_text())
    monkeypatch.chdir(tmp_path)

    def fake_runtime(rubric_path, config, seed):
        rub = load_rubric(rubric_path)
        return JudgeRuntime(rub, Judge(rub, judge_roles()), Tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", "selftune"),
                            tmp_path)

    monkeypatch.setattr(runtime, "judge_runtime", fake_runtime)
    return labels, rubric


def test_calibrate_and_judge_commands(tmp_path, monkeypatch):
    """The CLI end to end with the scripted judge swapped in: MLflow run, report, JSON out."""
    from mlflow import MlflowClient

    labels, rubric = cli_with(tmp_path, monkeypatch, scripted)
    runner = CliRunner()
    out = tmp_path / "agreement.json"
    r = runner.invoke(
        cli.app, ["calibrate", "--rubric", str(rubric), "--labels", str(labels), "--align", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "kappa(quadratic)" in r.output and "after alignment" in r.output
    res = json.loads(out.read_text())
    assert res["align"]["held_out_items"] + res["align"]["fit_items"] == 6
    run_id = re.search(r"MLflow run: (\w+)", r.output).group(1)
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert "calibrate/grounded/kappa" in run.data.metrics and "align/after/grounded/n" in run.data.metrics
    items_out = tmp_path / "judged.jsonl"
    r = runner.invoke(cli.app, ["judge", "--rubric", str(rubric), "--items", str(labels), "--out", str(items_out)])
    assert r.exit_code == 0, r.output
    first = json.loads(items_out.read_text().splitlines()[0])
    assert first["scores"]["grounded"]["raw"] == 5 and "labels" not in first
    r = runner.invoke(cli.app, ["calibrate", "--rubric", str(rubric), "--labels", str(tmp_path / "missing.jsonl")])
    assert r.exit_code == 2 and "missing.jsonl: file not found" in r.output


@pytest.mark.e2e
def test_calibrate_with_the_embedded_judge(tmp_path, monkeypatch):
    """The real SmolLM2 judge on 12 of the shipped labels: every item gets a valid score and the
    agreement figures are computed (whatever they are: a 135M judge agrees poorly)."""
    labels = tmp_path / "labels.jsonl"
    lines = (ROOT / "datasets/labels/pyref-labels.jsonl").read_text().splitlines()[:12]
    labels.write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "agreement.json"
    r = CliRunner().invoke(
        cli.app,
        ["calibrate", "--rubric", str(ROOT / "configs/rubrics/taste.yaml"), "--labels", str(labels), "--out", str(out)],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    g = json.loads(out.read_text())["all"]["grounded"]
    assert g["n"] == 12 and g["invalid"] == 0
    # rho on the unrounded scores, recomputed from the items written out (None when the judge gives every
    # item the same score, as a 135M judge may)
    from scipy.stats import spearmanr

    items = json.loads(out.read_text())["items"]
    human = [i["labels"]["grounded"] for i in items]
    judged = [i["scores"]["grounded"]["score"] for i in items]
    if len(set(judged)) > 1:
        assert g["spearman"] == pytest.approx(spearmanr(human, judged).statistic)
    else:
        assert g["spearman"] is None


def test_calibrate_a_judge_panel_reports_each_member_and_their_agreement(tmp_path, monkeypatch):
    from selftune.calibrate import member_judgments

    ones = fake_role(lambda m: json.dumps({"rationale": "always 1", "score": 1}), name="ones")
    labels, rubric = cli_with(tmp_path, monkeypatch, lambda: [scripted(), ones])
    out = tmp_path / "agreement.json"
    r = CliRunner().invoke(cli.app, ["calibrate", "--rubric", str(rubric), "--labels", str(labels), "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    # the scripted member alone agrees as in the single-judge test; the always-1 member matches only the two 1s
    assert res["members"]["fake"]["grounded"]["exact_agreement"] == pytest.approx(4 / 6)
    assert res["members"]["ones"]["grounded"]["exact_agreement"] == pytest.approx(2 / 6)
    # pass/fail (>= 0.5 on [0, 1]) between members: the scripted judge fails only a2 (1; a 3 is 0.5, a
    # pass), the always-1 member fails everything -> they agree on 1 of 6
    assert res["panel_agreement"]["grounded/rate"] == pytest.approx(1 / 6)
    assert "judge ones alone" in r.output and "judges against each other" in r.output
    js = judge_all(Judge(RUBRIC, [scripted(), ones]), rows(), no_progress)
    assert [j.scores["grounded"].raw for j in member_judgments(RUBRIC, js, "ones")] == [1] * 6


@pytest.mark.e2e
def test_calibrate_with_a_panel_of_embedded_judges(tmp_path, monkeypatch):
    """Two embedded judges as a panel (from a config): each member is scored against 6 shipped labels
    and the members against each other; every item gets a valid score from both."""
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join((ROOT / "datasets/labels/pyref-labels.jsonl").read_text().splitlines()[:6]) + "\n")
    (tmp_path / "docs").mkdir()
    config = tmp_path / "panel.yaml"
    config.write_text(f"""
corpus: {{path: docs}}
rubric: {ROOT / "configs/rubrics/taste.yaml"}
workdir: work
sut: {{params: {{instructions: {{type: text, initial: x}}, top_k: {{type: int, low: 1, high: 2, initial: 1}},
       chunk_size: {{type: choice, choices: [300], initial: 300}},
       chunk_overlap: {{type: choice, choices: [0], initial: 0}}}}}}
judge:
  models: [{{model: local, max_tokens: 40}}, {{model: local, max_tokens: 24}}]
  aggregate: min
""")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "agreement.json"
    r = CliRunner().invoke(
        cli.app,
        [
            "calibrate",
            "--rubric",
            str(ROOT / "configs/rubrics/taste.yaml"),
            "--labels",
            str(labels),
            "--config",
            str(config),
            "--out",
            str(out),
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert set(res["members"]) == {"judge", "judge2"}
    for member in res["members"].values():
        assert member["grounded"]["n"] == 6 and member["grounded"]["invalid"] == 0
    assert res["panel_agreement"]["grounded/n"] == 6
    # pass/fail agreement recomputed from each member's raw score (scale 1..5, pass: normalized >= 0.5)
    raws = [i["scores"]["grounded"]["by_judge"] for i in res["items"]]
    same = [((r["judge"] - 1) / 4 >= 0.5) == ((r["judge2"] - 1) / 4 >= 0.5) for r in raws]
    assert res["panel_agreement"]["grounded/rate"] == pytest.approx(sum(same) / 6)
    assert (tmp_path / "work" / "mlflow.db").is_file()
