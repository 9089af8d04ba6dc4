import pytest

from selftune.config import GateSpec
from selftune.gate import decide, paired_bootstrap
from selftune.objective import whole_rubric
from selftune.records import Answer, Evaluation, Judgment, Probe, Score
from selftune.rubric import Rubric

RUBRIC = Rubric.model_validate({"criteria": [{"name": "c", "kind": "check", "check": {"type": "word_bounds"}}]})
ON_C = whole_rubric(RUBRIC, 0.0)


def ev(values, crit=None, split="val"):
    js = []
    for i, v in enumerate(values):
        c = crit[i] if crit else v
        a = Answer(probe=Probe(id=str(i), question="q?", split=split), text="a")
        js.append(Judgment(answer=a, scores={"c": Score(value=c)}, overall=v))
    return Evaluation(params={}, split=split, judgments=tuple(js))


def test_bootstrap_of_constant_diffs_is_degenerate():
    assert paired_bootstrap([0.25] * 5, 0.9, 500, 0) == (0.25, 0.25, 0.25)


def test_bootstrap_mean_and_interval_bracket():
    diffs = [0.0, 0.1, 0.2, 0.3, 0.4]
    mean, lo, hi = paired_bootstrap(diffs, 0.9, 4000, 1)
    assert mean == pytest.approx(0.2)
    # hand-computed: the mean of 5 draws has SD sqrt(0.02 / 5) = 0.0632, so the 90% percentile interval
    # is about 0.2 -/+ 1.645 * 0.0632 = [0.096, 0.304] (the exact bootstrap distribution is discrete)
    assert lo == pytest.approx(0.096, abs=0.02) and hi == pytest.approx(0.304, abs=0.02)
    assert paired_bootstrap(diffs, 0.9, 4000, 1) == (mean, lo, hi)  # seeded: the same interval again


def test_promotes_clear_gain():
    d = decide(ev([0.9, 0.8, 0.9, 0.95, 0.85, 0.9]), ev([0.5, 0.4, 0.6, 0.5, 0.45, 0.5]), ON_C, GateSpec(), 0)
    assert d.promote and d.delta == pytest.approx(0.391666, abs=1e-4) and d.ci_low > 0


def test_rejects_gain_within_noise():
    d = decide(ev([0.9, 0.1, 0.9, 0.1]), ev([0.1, 0.9, 0.1, 0.8]), ON_C, GateSpec(), 0)
    assert not d.promote and "noise" in d.reason


def test_clear_loss_is_called_a_loss():
    d = decide(ev([0.1, 0.2, 0.1, 0.2]), ev([0.8, 0.9, 0.8, 0.9]), ON_C, GateSpec(), 0)
    assert not d.promote and d.reason.startswith("worse than the incumbent by 0.700")


def test_rejects_when_a_criterion_regresses():
    cand = ev([0.9] * 6, crit=[0.3] * 6)
    inc = ev([0.5] * 6, crit=[0.5] * 6)
    d = decide(cand, inc, ON_C, GateSpec(), 0)
    assert not d.promote and "regress" in d.reason and d.criterion_deltas["c"] == pytest.approx(-0.2)


def test_invalid_items_are_not_paired():
    cand = ev([0.9, None, 0.9])
    inc = ev([0.1, 0.1, None])
    d = decide(cand, inc, ON_C, GateSpec(), 0)
    assert d.n_paired == 1 and not d.promote


def test_min_detectable_effect_by_hand():
    from selftune.gate import min_detectable_effect

    # (z_0.95 + z_0.8) * sd / sqrt(n) = (1.6449 + 0.8416) * 0.1 / sqrt(42) = 0.0384
    assert min_detectable_effect(0.1, 42, 0.9) == pytest.approx(0.0384, abs=5e-4)
    # the spread: at SD 0.13, 40 probes see about 0.05; 10 probes see only 0.1
    assert min_detectable_effect(0.13, 40, 0.9) == pytest.approx(0.0511, abs=5e-4)
    assert min_detectable_effect(0.1, 10, 0.9) > 2 * min_detectable_effect(0.1, 42, 0.9)
    assert min_detectable_effect(0.1, 1, 0.9) is None


def test_gain_pairs_by_probe_and_brackets_the_mean():
    from selftune.gate import gain

    cand, inc = ev([0.9, 0.8, 0.7, 0.9, 0.6, 0.8]), ev([0.5, 0.6, 0.6, 0.4, 0.6, 0.5])
    g = gain(cand, inc, ON_C, GateSpec(), 0)
    assert g["gain"] == pytest.approx(0.25) and g["n"] == 6 and g["low"] < 0.25 < g["high"] and g["low"] > 0
    assert gain(ev([0.9]), ev([0.1]), ON_C, GateSpec(), 0) is None  # one pair is no interval


def test_a_criterion_drop_within_noise_does_not_block_but_is_named():
    """One 0/1 check lost on 1 item of 40 (-0.025, beyond max_criterion_drop 0.02) while the overall
    gains clearly: the drop's own paired interval reaches 0, so it is noise, named in the reason; the same
    drop on every item is a regression and blocks."""
    rubric = Rubric.model_validate({"criteria": [
        {"name": "c", "kind": "check", "check": {"type": "word_bounds"}},
        {"name": "q", "kind": "check", "check": {"type": "word_bounds"}}]})
    on = whole_rubric(rubric, 0.0)

    def ev2(overall, q):
        js = tuple(Judgment(answer=Answer(probe=Probe(id=str(i), question="q?", split="val"), text="a"),
                            scores={"c": Score(value=o), "q": Score(value=v)}, overall=o)
                   for i, (o, v) in enumerate(zip(overall, q)))
        return Evaluation(params={}, split="val", judgments=js)

    n = 40
    inc = ev2([0.5] * n, [1.0] * n)
    one_lost = ev2([0.6 + 0.01 * (i % 3) for i in range(n)], [0.0] + [1.0] * (n - 1))
    d = decide(one_lost, inc, on, GateSpec(), 0)
    assert d.criterion_deltas["q"] == pytest.approx(-0.025)
    assert d.promote and "drops within noise: q -0.025" in d.reason
    all_lost = ev2([0.6 + 0.01 * (i % 3) for i in range(n)], [0.9] * n)
    d = decide(all_lost, inc, on, GateSpec(), 0)
    assert not d.promote and d.reason.startswith("criteria regress: q -0.100 [-0.100, -0.100]")


def test_the_mde_spread_is_pooled_within_comparisons_not_across_them():
    """Two candidates, one a clear +0.2 and one a clear -0.2 against the same incumbent, each with a
    small item-to-item spread: their own gains are effects, not noise, so the paired SD the minimum
    detectable effect rests on is the within-comparison spread (~0.01), not the ~0.2 of the lot."""
    from types import SimpleNamespace

    from selftune.loop import _evidence
    from selftune.records import GateDecision, Round

    n = 20
    base = ev([0.5] * n)
    up = ev([0.7 + (0.01 if i % 2 else -0.01) for i in range(n)])
    down = ev([0.3 + (0.01 if i % 2 else -0.01) for i in range(n)])
    rounds = [Round(index=k, params={}, train=ev([], split="train"), val=v, incumbent_index=0,
                    gate=GateDecision(promote=k == 0, reason="")) for k, v in enumerate((base, up, down))]
    out = _evidence(rounds, rounds[0], base, base, ON_C, ON_C, SimpleNamespace(gate=GateSpec(), seed=0), n, False)
    assert out["gate/paired_sd"] == pytest.approx(0.01026, abs=1e-4)  # sqrt(2 * 20 * 0.0001 / 38)
    assert out["gate/min_detectable_effect"] < 0.01


def test_the_mde_rests_on_comparisons_with_small_gains():
    """A lever that mends a quarter of the items (+0.6 each, the rest unmoved) has a wide spread made
    of its own effect; beside it, two small-gain comparisons with a spread of ~0.05. The figure rests on
    the small ones; the all-comparison figure, logged beside it, includes the lever's spread."""
    from types import SimpleNamespace

    from selftune.loop import _evidence
    from selftune.records import GateDecision, Round

    n = 40
    base = ev([0.3] * n)
    lever = ev([0.9 if i % 4 == 0 else 0.3 for i in range(n)])  # mean +0.15, SD ~0.26
    small1 = ev([0.9 + (0.05 if i % 2 else -0.05) if i % 4 == 0 else 0.3 + (0.05 if i % 2 else -0.05)
                 for i in range(n)])
    small2 = ev([v + 0.02 for v in (s.overall for s in small1.judgments)])
    rounds = [Round(index=k, params={}, train=ev([], split="train"), val=v, incumbent_index=k,
                    gate=GateDecision(promote=True, reason="")) for k, v in enumerate((base, lever, small1, small2))]
    out = _evidence(rounds, rounds[-1], base, base, ON_C, ON_C, SimpleNamespace(gate=GateSpec(), seed=0), n, False)
    assert out["gate/comparisons"] == 3 and out["gate/comparisons_small"] == 2
    assert out["gate/paired_sd_all"] > 0.15 > 0.06 > out["gate/paired_sd"] > 0.03
    assert out["gate/min_detectable_effect"] < 0.05 < out["gate/min_detectable_effect_all"]
