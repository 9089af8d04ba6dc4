
import pytest
from typer.testing import CliRunner

from conftest import ROOT, write_config
from selftune.cli import app
from selftune.config import load_config
from selftune.errors import InputError


def test_default_config_loads_and_resolves_paths():
    cfg = load_config(ROOT / "configs/rag.yaml") if (ROOT / "datasets/pyref").is_dir() else None
    if cfg is None:
        pytest.skip("demo corpus not materialized")
    assert cfg.rubric == (ROOT / "configs/rubrics/taste.yaml").resolve()
    assert cfg.optimizer.rounds >= 3 and cfg.probes.count >= 24


def test_valid_config(tmp_path, corpus_dir):
    cfg = load_config(write_config(tmp_path, corpus_dir))
    assert cfg.sut.params["top_k"].initial == 2
    assert cfg.corpus.path == corpus_dir


@pytest.mark.parametrize("extra, key, expected", [
    ("colour: blue", "colour", "unknown key"),
    ("optimizer: {rounds: many}", "optimizer.rounds", "integer"),
    ("optimizer: {rounds: -1}", "optimizer.rounds", "greater than or equal to 0"),
    ("gate: {confidence: 2}", "gate.confidence", "less than 1"),
    ("models: {judge: {model: gpt4}}", "models.judge.model", "LiteLLM id"),
    ("models: {judge: {modle: local}}", "models.judge.modle", "unknown key"),
    ("judge: {models: [local, gpt4]}", "judge.models.1.model", "LiteLLM id"),
    ("judge: {models: []}", "judge.models", "at least 1"),
    ("judge: {aggregate: vote}", "judge.aggregate", "mean"),
    ("models: {judge: {model: local}}\njudge: {models: [local, local]}", "judge.models", "name the judge once"),
])
def test_bad_values_name_file_and_key(tmp_path, corpus_dir, extra, key, expected):
    path = write_config(tmp_path, corpus_dir)
    path.write_text(path.read_text() + extra + "\n")
    with pytest.raises(InputError) as info:
        load_config(path)
    assert info.value.file == str(path)
    assert info.value.key == key
    assert expected in info.value.expected


def test_initial_outside_range(tmp_path, corpus_dir):
    path = write_config(tmp_path, corpus_dir)
    path.write_text(path.read_text().replace("high: 3, initial: 2", "high: 3, initial: 9"))
    with pytest.raises(InputError) as info:
        load_config(path)
    assert info.value.key.startswith("sut.params.top_k") and "low <= initial <= high" in info.value.expected


def test_overlap_must_be_below_size(tmp_path, corpus_dir):
    path = write_config(tmp_path, corpus_dir)
    path.write_text(path.read_text().replace("choices: [0, 20], initial: 20", "choices: [0, 150], initial: 0"))
    with pytest.raises(InputError) as info:
        load_config(path)
    assert info.value.key == "sut.params.chunk_overlap"


def test_missing_corpus_and_rubric(tmp_path, corpus_dir):
    path = write_config(tmp_path, tmp_path / "nope")
    with pytest.raises(InputError, match="corpus.path"):
        load_config(path)
    path = write_config(tmp_path, corpus_dir)
    (tmp_path / "rubric.yaml").unlink()
    with pytest.raises(InputError, match="rubric"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(InputError, match="valid YAML"):
        load_config(bad)


def test_cli_bad_config_exits_2_without_traceback(tmp_path, corpus_dir):
    path = write_config(tmp_path, corpus_dir, colour="blue")
    result = CliRunner().invoke(app, ["tune", str(path)])
    assert result.exit_code == 2
    assert "colour" in result.output and str(path) in result.output
    assert "Traceback" not in result.output


def test_cli_missing_api_key_fails_before_work(tmp_path, corpus_dir, monkeypatch):
    monkeypatch.delenv("SELFTUNE_TEST_KEY", raising=False)
    path = write_config(tmp_path, corpus_dir,
                        models="{judge: {model: openai/gpt-4o-mini, api_key_env: SELFTUNE_TEST_KEY}}")
    result = CliRunner().invoke(app, ["tune", str(path)])
    assert result.exit_code == 2
    assert "SELFTUNE_TEST_KEY" in result.output
    assert not (tmp_path / "work" / "mlflow.db").exists()


def test_judge_panel_config(tmp_path, corpus_dir):
    path = write_config(tmp_path, corpus_dir)
    path.write_text(path.read_text() + "judge: {models: [local, {model: openai/gpt-4o-mini, max_tokens: 200}], "
                                       "aggregate: min, trust: {min_agreement: 0.7}}\n")
    cfg = load_config(path)
    specs = cfg.judge_specs()
    assert [s.model for s in specs] == ["local", "openai/gpt-4o-mini"] and specs[1].max_tokens == 200
    assert cfg.judge.aggregate == "min" and cfg.judge.trust.min_agreement == 0.7


def test_trust_bar_keys_and_labels_path(tmp_path, corpus_dir):
    cfg = load_config(write_config(tmp_path, corpus_dir))
    t = cfg.judge.trust
    assert (t.min_valid, t.min_items, t.min_discrimination, t.min_spread, t.labels) == (0.95, 10, 0.2, 0.05, None)
    assert cfg.judge.retest_sample >= t.min_items  # the default tune can prove its judge
    (tmp_path / "labels.jsonl").write_text("")
    cfg = load_config(write_config(tmp_path, corpus_dir, judge="{trust: {labels: labels.jsonl, min_kappa: 0.5}}"))
    assert cfg.judge.trust.labels == tmp_path / "labels.jsonl" and cfg.judge.trust.min_kappa == 0.5
    with pytest.raises(InputError, match=r"judge\.trust\.labels: expected an existing JSONL file"):
        load_config(write_config(tmp_path, corpus_dir, judge="{trust: {labels: nowhere.jsonl}}"))
    with pytest.raises(InputError, match=r"judge\.trust\.min_valid"):
        load_config(write_config(tmp_path, corpus_dir, judge="{trust: {min_valid: 1.5}}"))


@pytest.mark.parametrize("param, key, expected", [
    ("hybrid_weight: {type: choice, choices: [0.0, 1.5], initial: 0.0}", "sut.params.hybrid_weight", "in [0, 1]"),
    ("hybrid_weight: {type: text, initial: dense}", "sut.params.hybrid_weight", "number"),
    ("demos: {type: float, low: 0, high: 2.5, initial: 0}", "sut.params.demos", "int or choice of integers"),
    ("demos: {type: choice, choices: [0, 1.5], initial: 0}", "sut.params.demos", "int or choice of integers"),
    ("max_tokens: {type: int, low: 0, high: 64, initial: 48}", "sut.params.max_tokens", "in [1, 8192]"),
    ("repeat_penalty: {type: float, low: 0.5, high: 1.3, initial: 1.0}", "sut.params.repeat_penalty", "in [1, 2]"),
    ("temperature: {type: choice, choices: [0.0, hot], initial: 0.0}", "sut.params.temperature", "number"),
    ("hybrid_weight: {type: float, low: 0.0, high: 1.0, initial: 2.0}", "sut.params.hybrid_weight", "low <= initial"),
])
def test_bad_optional_rag_params(tmp_path, corpus_dir, param, key, expected):
    path = write_config(tmp_path, corpus_dir)
    path.write_text(path.read_text().replace("optimizer:", f"    {param}\noptimizer:"))
    with pytest.raises(InputError) as info:
        load_config(path)
    assert info.value.key.startswith(key) and expected in info.value.expected


def test_optional_rag_params_load_and_a_hosted_sut_has_no_repeat_penalty(tmp_path, corpus_dir):
    params = ("    hybrid_weight: {type: float, low: 0.0, high: 1.0, initial: 0.0}\n"
              "    demos: {type: int, low: 0, high: 2, initial: 0}\n"
              "    max_tokens: {type: choice, choices: [32, 48], initial: 48}\n"
              "    repeat_penalty: {type: choice, choices: [1.0, 1.3], initial: 1.0}\n")
    path = write_config(tmp_path, corpus_dir)
    path.write_text(path.read_text().replace("optimizer:", params + "optimizer:"))
    from selftune.config import initial_params
    assert {k: v for k, v in initial_params(load_config(path)).items() if k != "instructions"} == {
        "top_k": 2, "chunk_size": 200, "chunk_overlap": 20, "hybrid_weight": 0.0, "demos": 0, "max_tokens": 48,
        "repeat_penalty": 1.0}
    path.write_text(path.read_text() + "models: {sut: {model: openai/gpt-4o-mini}}\n")
    with pytest.raises(InputError) as info:
        load_config(path)
    assert info.value.key == "sut.params.repeat_penalty" and "frequency_penalty" in info.value.expected


def test_load_params_merges_over_initial_and_reads_what_tune_writes(tmp_path, corpus_dir):
    from selftune.config import initial_params, load_params
    from selftune.loop import write_best

    cfg = load_config(write_config(tmp_path, corpus_dir))
    partial = tmp_path / "p.yaml"
    partial.write_text("params: {top_k: 3}\n")
    assert load_params(partial, cfg) == {**initial_params(cfg), "top_k": 3}
    best = {"instructions": "Quote the context: \"é\".", "top_k": 1, "chunk_size": 120, "chunk_overlap": 0}
    write_best(tmp_path / "best" / "t.yaml", best)
    assert load_params(tmp_path / "best" / "t.yaml", cfg) == best


def test_bad_glob_and_corpus_keys(tmp_path, corpus_dir):
    path = write_config(tmp_path, corpus_dir)
    path.write_text(path.read_text().replace(f"corpus: {{path: {corpus_dir}}}",
                                             f"corpus: {{path: {corpus_dir}, glob: ['/etc/*']}}"))
    with pytest.raises(InputError, match="relative to corpus.path") as info:
        load_config(path)
    assert info.value.key == "corpus.glob[0]"
    path.write_text(path.read_text().replace("glob: ['/etc/*']", "follow_symlinks: true, max_file_mb: 0.5"))
    cfg = load_config(path)
    assert cfg.corpus.follow_symlinks is True and cfg.corpus.max_file_mb == 0.5
