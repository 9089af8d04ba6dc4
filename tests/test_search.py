"""search.py on small synthetic problems; gridbench on the real RAG-HPO grid when it is present."""

import statistics

import optuna
import pytest

from selftune import gridbench
from selftune.errors import InputError
from selftune.search import Exhausted, Ledger, MultiFidelitySearch

optuna.logging.set_verbosity(optuna.logging.WARNING)

# A synthetic RAG: the cheap score peaks at top_k=3, chunk=500; the full score adds a bump in `temp`.
RETRIEVAL = {"top_k": [1, 2, 3, 4, 5, 6], "chunk": [300, 500, 800]}
OTHER = {"temp": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]}


def cheap(p):
    return 1.0 - abs(p["top_k"] - 3) / 10 - abs(p["chunk"] - 500) / 1000


def full(p):
    return cheap(p) - (p["temp"] - 0.7) ** 2


def drive(search, n, value=full):
    """Ask/tell ``n`` candidates; the params in order."""
    out = []
    for _ in range(n):
        cand = search.ask()
        out.append(cand.params)
        search.tell(cand, value(cand.params))
    return out


def test_stage1_carries_the_best_cheap_settings_and_ties():
    s = MultiFidelitySearch(RETRIEVAL, OTHER, cheap, seed=0, carry=0.2)
    carried = s.screen()
    assert s.ledger.cheap == 18 and len(s.scores) == 18  # a small grid is screened whole, once each
    # 1.0 (3, 500); 0.9 (2|4, 500); 0.8 (1|5, 500), (3, 300): the 4th best (ceil(0.2 x 18)) ties with two more
    assert carried[0] == {"top_k": 3, "chunk": 500}
    assert {(c["top_k"], c["chunk"]) for c in carried} == {(3, 500), (2, 500), (4, 500), (1, 500), (5, 500), (3, 300)}
    no_ties = MultiFidelitySearch(RETRIEVAL, OTHER, lambda p: p["top_k"] * 1000 + p["chunk"], seed=0, carry=3 / 18)
    assert [(c["top_k"], c["chunk"]) for c in no_ties.screen()] == [(6, 800), (6, 500), (6, 300)]


def test_stage1_on_a_large_grid_screens_a_sample_then_what_stage2_draws():
    big = {"a": list(range(20)), "b": list(range(20))}
    s = MultiFidelitySearch(big, OTHER, lambda p: -abs(p["a"] - 15) - abs(p["b"] - 4), seed=1, screen_budget=30)
    s.screen()
    assert s.ledger.cheap == 30 and len(s.scores) == 30
    seen = drive(s, 20, value=lambda p: -abs(p["a"] - 15) - abs(p["b"] - 4) - p["temp"])
    assert s.ledger.cheap == len(s.scores) > 30  # stage 2 scored the settings it drew, each once
    assert s.ledger.cheap < 400
    threshold = sorted((v for v in s.scores.values()), reverse=True)[int(0.4 * len(s.scores))]
    assert all(s.scores[(("a", p["a"]), ("b", p["b"]))] >= threshold - 4 for p in seen)


def test_stage2_finds_the_optimum_of_a_known_function_in_few_evaluations():
    optimum = {"top_k": 3, "chunk": 500, "temp": 0.7}
    needed = []
    for seed in range(10):
        s = MultiFidelitySearch(RETRIEVAL, OTHER, cheap, seed=seed, carry=0.1)
        seen = drive(s, 33)  # 3 carried settings x 11 temperatures
        assert len({tuple(sorted(p.items())) for p in seen}) == 33  # never the same candidate twice
        assert s.best() == (optimum, pytest.approx(1.0))
        assert s.ledger == Ledger(cheap=18, full=33, repeats=s.ledger.repeats)
        needed.append(seen.index(optimum) + 1)
    assert statistics.mean(needed) <= 12  # blind enumeration of the 33 needs 17 on average
    assert s.ledger.cost(0.1) == pytest.approx(33 + 1.8)


def test_the_gp_sampler_drives_stage2():
    # Wiring only: on this toy space (temp is categorical, so one-hot to the GP) it is no faster than
    # blind enumeration; its efficiency is measured on the real grid (gridbench, and the test below).
    s = MultiFidelitySearch(RETRIEVAL, OTHER, cheap, seed=0, carry=0.1, sampler="gp", deterministic=True)
    seen = drive(s, 12)
    assert isinstance(s._open().sampler, optuna.samplers.GPSampler)
    assert s._open().sampler._deterministic
    assert len({tuple(sorted(p.items())) for p in seen}) == 12  # never the same candidate twice
    assert s.ledger == Ledger(cheap=18, full=12, repeats=s.ledger.repeats)
    assert not MultiFidelitySearch(RETRIEVAL, OTHER, cheap, seed=0, sampler="gp")._open().sampler._deterministic


def test_stage2_keeps_to_the_carried_settings_until_they_are_worked_through():
    s = MultiFidelitySearch(RETRIEVAL, OTHER, cheap, seed=3, carry=0.1)
    seen = drive(s, 33)  # (3 | 2 | 4, 500) x 11 temperatures: the whole carried space
    assert {(p["top_k"], p["chunk"]) for p in seen} == {(3, 500), (2, 500), (4, 500)}
    assert s.ledger.repeats > 0  # TPE drew outside the carried settings: recorded as pruned, not handed out
    drive(s, 5)  # then the carried share widens
    assert s.carry == pytest.approx(0.25) and len(s.carried) > 3
    assert s.ledger.full == 38


def test_pruned_and_failed_candidates_never_count_as_scores():
    s = MultiFidelitySearch(RETRIEVAL, OTHER, cheap, seed=0, carry=0.1)
    for _ in range(3):
        c = s.ask()
        s.report(c, 10, 0.5)
        s.tell(c, 0.5)
    low = s.ask()
    s.report(low, 10, 0.1)
    assert s.should_prune(low)  # bottom quarter at step 10 once 3 trials completed
    s.prune(low)
    high = s.ask()
    s.report(high, 10, 9.0)  # a huge partial score, then pruned anyway: still not a score
    s.prune(high)
    broken = s.ask()
    s.tell(broken, None)
    assert s.best()[1] == 0.5
    assert (s.ledger.full, s.ledger.pruned, s.ledger.failed) == (3, 2, 1)
    states = [t.state for t in s._study.trials if t.number in (low.number, high.number, broken.number)]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL]
    again = drive(s, 8, value=lambda p: 0.5)
    assert broken.params not in again  # a failed candidate is not handed out again


def test_should_prune_keeps_a_candidate_that_is_doing_well():
    s = MultiFidelitySearch(RETRIEVAL, OTHER, cheap, seed=0, carry=0.1)
    for v in (0.2, 0.3, 0.4):
        c = s.ask()
        s.report(c, 10, v)
        s.tell(c, v)
    c = s.ask()
    s.report(c, 10, 0.35)
    assert not s.should_prune(c)
    s.report(c, 20, 0.1)  # nobody else reached step 20: nothing to compare with
    assert not s.should_prune(c)


def test_same_seed_same_sequence():
    runs = [drive(MultiFidelitySearch(RETRIEVAL, OTHER, cheap, seed=7), 12) for _ in range(2)]
    assert runs[0] == runs[1]
    assert drive(MultiFidelitySearch(RETRIEVAL, OTHER, cheap, seed=8), 12) != runs[0]


def test_baseline_comes_first_and_its_retrieval_setting_is_carried():
    base = {"top_k": 6, "chunk": 800, "temp": 0.0}  # the worst cheap score
    s = MultiFidelitySearch(RETRIEVAL, OTHER, cheap, seed=0, carry=1, baseline=base)
    first = s.ask()
    assert first.params == base
    s.tell(first, full(base))
    assert {"top_k": 6, "chunk": 800} in s.carried
    with pytest.raises(ValueError, match="baseline"):
        MultiFidelitySearch(RETRIEVAL, OTHER, cheap, seed=0, baseline={"top_k": 9, "chunk": 800, "temp": 0.0})


def test_add_records_an_outside_evaluation_and_it_is_not_asked_again():
    def rank(p):
        return p["top_k"] * 1000 + p["chunk"]  # (6, 800) alone is carried

    s = MultiFidelitySearch(RETRIEVAL, {"temp": [0.0, 1.0]}, rank, seed=0, carry=1 / 18)
    s.add({"top_k": 6, "chunk": 800, "temp": 0.0}, 0.3)
    cand = s.ask()
    assert cand.params == {"top_k": 6, "chunk": 800, "temp": 1.0}
    assert s.best() == ({"top_k": 6, "chunk": 800, "temp": 0.0}, 0.3)


def test_a_finite_space_runs_out():
    s = MultiFidelitySearch({"k": [1, 2]}, {"t": [0, 1]}, lambda p: p["k"], seed=0, carry=0.1)
    seen = drive(s, 4, value=lambda p: p["k"] + p["t"])
    assert len({tuple(sorted(p.items())) for p in seen}) == 4
    with pytest.raises(Exhausted):
        s.ask()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="share names"):
        MultiFidelitySearch({"k": [1]}, {"k": [2]}, lambda p: 0.0, seed=0)
    with pytest.raises(ValueError, match="carry"):
        MultiFidelitySearch({"k": [1]}, {"t": [2]}, lambda p: 0.0, seed=0, carry=0)
    with pytest.raises(ValueError, match="sampler must be 'tpe' or 'gp'"):
        MultiFidelitySearch({"k": [1]}, {"t": [2]}, lambda p: 0.0, seed=0, sampler="cmaes")
    s = MultiFidelitySearch({"k": [1]}, {"t": [2, 3]}, lambda p: 0.0, seed=0)
    with pytest.raises(ValueError, match="step"):
        s.report(s.ask(), 0, 0.5)  # step 0 holds the cheap scores


# ---- gridbench -----------------------------------------------------------------------------------
HEADER = "Dataset,Chunk Size,Chunk Overlap,Embedding Model,Top-K,Generative Mode,Context Correctness,LLMaaJ-AC\n"


def test_grid_loader_takes_the_median_cheap_score_and_counts_disagreements(tmp_path):
    path = tmp_path / "grid.csv"
    rows = [f"X-Dev,256,0.0,e,3,{g},{cc},{ac}\n" for g, cc, ac in (("a", 0.5, 0.1), ("b", 0.5, 0.2), ("c", 0.4, 0.3))]
    rows += [f"X-Dev,512,0.0,e,3,{g},0.7,0.4\n" for g in "abc"]
    path.write_text(HEADER + "".join(rows))
    split = gridbench.load(path)["X-Dev"]
    assert split.cheap == {("256", "0.0", "e", "3"): 0.5, ("512", "0.0", "e", "3"): 0.7}
    assert split.inconsistent == 1
    assert split.full[("256", "0.0", "e", "3", "c")] == 0.3
    with pytest.raises(InputError, match="file not found"):
        gridbench.load(tmp_path / "none.csv")
    (tmp_path / "bad.csv").write_text("Dataset,Top-K\nX-Dev,3\n")
    with pytest.raises(InputError, match="header"):
        gridbench.load(tmp_path / "bad.csv")


@pytest.mark.skipif(not gridbench.DEFAULT_GRID.is_file(),
                    reason=f"the RAG-HPO grid is not at {gridbench.DEFAULT_GRID} (../shared is absent)")
def test_multi_fidelity_is_cheaper_than_random_search_on_the_real_grid():
    grid = gridbench.load(gridbench.DEFAULT_GRID)
    costs = {"random": [], "mf": []}
    for ds in ("AIArxiv", "BioASQ", "ClapNQ", "MiniWiki", "WatsonQA"):
        dev, test = grid[f"{ds}-Dev"], grid[f"{ds}-Test"]
        for name in costs:
            strategy = gridbench.STRATEGIES[name]
            costs[name] += [gridbench.replay(strategy, dev, test, seed, 0.01, 1.0)["cost"] for seed in range(6)]
    assert statistics.mean(costs["mf"]) < statistics.mean(costs["random"])
