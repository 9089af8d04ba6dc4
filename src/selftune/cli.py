"""Command line: ``selftune tune`` and ``selftune eval``. The only place logging is configured.

Bad input (config, rubric, questions) exits with code 2 and one line naming file, key and expectation.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import typer

from .errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Tune RAG pipelines against your rubric.")

# Offline by construction: nothing below may reach a hub or a telemetry endpoint at run time.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "False",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True", "RAGAS_DO_NOT_TRACK": "true", "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_ENABLE_ASYNC_LOGGING": "false", "DO_NOT_TRACK": "1",
}


class _DropTruncated(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "response was truncated" not in record.getMessage()


def _setup(workdir: Path | None = None) -> None:
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    if workdir is not None:
        os.environ.setdefault("DSPY_CACHEDIR", str(workdir / "dspy_cache"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "LiteLLM", "litellm", "chromadb", "sentence_transformers", "alembic", "mlflow", "dspy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # max_tokens is tight on purpose (the small local model rambles): a cut reply is not news.
    logging.getLogger("dspy.clients.lm").addFilter(_DropTruncated())


def _progress(iterable: Any, desc: str = "", total: int | None = None, leave: bool = True) -> Any:
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=leave, file=sys.stderr, dynamic_ncols=True)


def _fail(err: InputError) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def best_path(cfg: Any) -> Path:
    return cfg.workdir / "best" / f"{cfg.name}.yaml"


@app.command()
def tune(config: Path, rounds: int = typer.Option(None, help="override optimizer.rounds"),
         corpus: Path = typer.Option(None, help="point the config at another folder of documents")) -> None:
    """Run the tuning loop: probes, rounds, promotion, held-out test report; all logged to MLflow."""
    from .config import load_config

    try:
        cfg = load_config(config, corpus)
        _setup(cfg.workdir)
        from .loop import Session, tune as run_tune, write_best
        from .tracking import MlflowTracker

        session = Session(cfg)
        tracker = MlflowTracker(cfg)
        try:
            result = run_tune(session, cfg.optimizer.rounds if rounds is None else rounds, tracker, _progress)
        finally:
            session.close()
    except InputError as err:
        _fail(err)
    except KeyboardInterrupt:
        typer.echo("interrupted: finished rounds are kept in MLflow", err=True)
        raise typer.Exit(130) from None
    write_best(best_path(cfg), result.best.params)
    from .tracking import report

    typer.echo(report(result))
    typer.echo(f"MLflow run: {tracker.parent_id}  (experiment '{cfg.tracking.experiment}', {cfg.tracking_uri()})")
    typer.echo(f"best params: {best_path(cfg)}")


@app.command("eval")
def eval_(config: Path, questions: Path = typer.Option(..., help="JSONL: question, optional reference"),
          out: Path = typer.Option(..., help="where to write one JSON line per question"),
          corpus: Path = typer.Option(None, help="point the config at another folder of documents"),
          params: str = typer.Option("best", help="baseline | best | PATH to a params YAML")) -> None:
    """Answer your own questions with the pipeline and score them with the rubric."""
    from .config import initial_params, load_config, load_params

    try:
        cfg = load_config(config, corpus)
        _setup(cfg.workdir)
        from .loop import Session
        from .probes import load_user_probes

        probes = [p.model_copy(update={"split": "test"}) for p in load_user_probes(questions)]
        if not probes:
            raise InputError(questions, "", "no questions; expected one JSON object per line")
        if out.is_dir():
            raise InputError(out, "", "is a directory, expected a file to write the answers to")
        chosen = initial_params(cfg)
        if params != "baseline":
            path = best_path(cfg) if params == "best" else Path(params)
            if not path.exists():
                raise InputError(path, "", "no params file (run `selftune tune` first, or pass --params baseline)")
            chosen = load_params(path, cfg)
        session = Session(cfg)
        try:
            ev = session.evaluate(chosen, probes, "test", _progress)
        finally:
            session.close()
    except InputError as err:
        _fail(err)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for j in ev.judgments:
            fh.write(json.dumps({
                "question": j.answer.probe.question, "answer": j.answer.text,
                "contexts": [c.text for c in j.answer.contexts], "error": j.answer.error, "overall": j.overall,
                "scores": {n: {"score": s.value, "raw": s.raw, "status": s.status, "rationale": s.rationale}
                           for n, s in j.scores.items()},
            }, ensure_ascii=False) + "\n")
    typer.echo(f"wrote {len(ev.judgments)} answers to {out} (overall {ev.overall() if ev.overall() is not None else 'n/a'})")


def _judge_setup(rubric_path: Path, config: Path | None, seed: int) -> tuple[Any, Any, Any, str, Path]:
    """(rubric, Judge, closer, tracking uri, workdir) for commands that need no corpus: the judge
    model and tracking store come from ``--config`` if given, else the embedded model and ./.selftune."""
    from .rubric import load_rubric

    rubric = load_rubric(rubric_path)
    if config is not None:
        from .config import load_config

        cfg = load_config(config)
        specs, method, flag_cap, aggregate = cfg.judge_specs(), cfg.judge.method, cfg.judge.flag_cap, cfg.judge.aggregate
        uri, workdir, experiment = cfg.tracking_uri(), cfg.workdir, cfg.tracking.experiment
        from .lm import check_credentials

        check_credentials(cfg)
    else:
        from .config import ModelSpec

        specs, method, flag_cap, aggregate = [ModelSpec(model="local", max_tokens=40)], "auto", 0.0, "mean"
        workdir = Path(".selftune")
        uri, experiment = f"sqlite:///{(workdir / 'mlflow.db').resolve()}", "selftune"
    _setup(workdir)
    from .judge import Judge
    from .lm import LlamaCppEngine, build_role, local_gguf_path

    engines: list[Any] = []

    def engine() -> Any:
        engines.append(LlamaCppEngine(local_gguf_path(), seed=seed))
        return engines[-1]

    roles = [build_role("judge" if i == 0 else f"judge{i + 1}", spec, engine if spec.model == "local" else None)
             for i, spec in enumerate(specs)] if rubric.needs_judge_model() else None
    embedder = None
    if any(c.metric == "answer_relevancy" for c in rubric.ragas_criteria()):
        from .index import Embedder

        embedder = Embedder(cfg.embedder if config is not None else "default")
    judge = Judge(rubric, roles, seed=seed, method=method, flag_cap=flag_cap, embedder=embedder, aggregate=aggregate)
    return rubric, judge, lambda: [e.close() for e in engines], f"{uri}|{experiment}", workdir


@app.command("judge")
def judge_cmd(rubric: Path = typer.Option(..., help="rubric YAML"),
              items: Path = typer.Option(..., help="JSONL: question, answer, optional contexts, reference"),
              out: Path = typer.Option(..., help="where to write one JSON line per item"),
              config: Path = typer.Option(None, help="take the judge model from this config"),
              seed: int = 0) -> None:
    """Score any items against a rubric: no corpus, no index."""
    try:
        from .calibrate import judge_all, judgment_row, read_items

        rows = read_items(items)
        rub, judge, close, _, _ = _judge_setup(rubric, config, seed)
        try:
            judgments = judge_all(judge, rows, _progress)
        finally:
            close()
    except InputError as err:
        _fail(err)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for row, j in zip(rows, judgments):
            fh.write(json.dumps(judgment_row(row, j), ensure_ascii=False) + "\n")
    valid = sum(j.valid for j in judgments)
    typer.echo(f"wrote {len(judgments)} judgments to {out} ({valid} valid)")


@app.command()
def calibrate(rubric: Path = typer.Option(..., help="rubric YAML"),
              labels: Path = typer.Option(..., help="JSONL items with human `labels` per criterion"),
              config: Path = typer.Option(None, help="take the judge model and MLflow store from this config"),
              align: bool = typer.Option(False, help="use half the labels as calibration examples; report before/after on the rest"),
              out: Path = typer.Option(None, help="also write the agreement report as JSON here"),
              seed: int = 0) -> None:
    """Agreement of the judge with human labels: Cohen's kappa and Spearman's rho with bootstrap
    95% intervals and the confusion table per criterion; logged to MLflow."""
    from .calibrate import agreement, align_examples, judge_all, read_items, split_for_alignment
    from .config import JudgeSpec
    from .records import Evaluation
    from .rubric import load_rubric

    try:
        rows = read_items(labels, load_rubric(rubric), need_labels=True)
        rub, judge, close, where, _ = _judge_setup(rubric, config, seed)
        try:
            judgments = judge_all(judge, rows, _progress)
            result: dict[str, Any] = {"labels": str(labels), "n": len(rows), "all": agreement(rub, rows, judgments, seed)}
            if len(judge.roles) > 1:  # a panel: each member against the labels, and the members against each other
                from .calibrate import member_judgments
                from .trust import Monitor

                result["members"] = {name: agreement(rub, rows, member_judgments(rub, judgments, name), seed)
                                     for name in judge.names}
                panel = Monitor(rub, judge, JudgeSpec())
                panel.observe([Evaluation(params={}, split="test", judgments=tuple(judgments))])
                result["panel_agreement"] = {k.split("/", 1)[1]: v for k, v in panel.stats.items()
                                             if k.startswith("agreement/")}
            if align:
                fit, held = split_for_alignment(len(rows), seed)
                aligned_rubric = align_examples(rub, [rows[i] for i in fit], [judgments[i] for i in fit])
                aligned = judge.variant(rubric=aligned_rubric, seed=seed)
                held_rows = [rows[i] for i in held]
                after = judge_all(aligned, held_rows, _progress, offset=10_000)
                result["align"] = {"fit_items": len(fit), "held_out_items": len(held),
                                   "before": agreement(rub, held_rows, [judgments[i] for i in held], seed),
                                   "after": agreement(aligned_rubric, held_rows, after, seed),
                                   "examples": {c.name: [e.model_dump() for e in c.examples]
                                                for c in aligned_rubric.llm_criteria()}}
        finally:
            close()
    except InputError as err:
        _fail(err)
    uri, experiment = where.split("|", 1)
    run_id = _log_calibration(uri, experiment, rubric, labels, result)
    typer.echo(_calibration_text(result))
    typer.echo(f"MLflow run: {run_id}  (experiment '{experiment}', {uri})")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2), encoding="utf-8")


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:+.2f}"


def _calibration_text(result: dict[str, Any]) -> str:
    lines = []
    sections = [("all items", result["all"])]
    sections += [(f"all items, judge {name} alone", agg) for name, agg in result.get("members", {}).items()]
    if "align" in result:
        sections += [(f"held-out {result['align']['held_out_items']} items, before alignment", result["align"]["before"]),
                     ("same items, after alignment", result["align"]["after"])]
    for title, agg in sections:
        lines.append(f"# {title}")
        for name, a in agg.items():
            k_lo, k_hi = a["kappa_ci95"]
            r_lo, r_hi = a["spearman_ci95"]
            lines.append(f"{name:16s} n={a['n']:3d} invalid={a['invalid']}  kappa({a['weights']}) {_fmt(a['kappa'])} "
                         f"[{_fmt(k_lo)}, {_fmt(k_hi)}]  rho {_fmt(a['spearman'])} [{_fmt(r_lo)}, {_fmt(r_hi)}]  "
                         f"exact {_fmt(a['exact_agreement'])}")
            lines.append(f"{'':16s} confusion (rows human, cols judge; levels {a['levels']}): {a['confusion']}")
    if result.get("panel_agreement"):
        lines.append("# judges against each other (pass/fail agreement; normalized scores)")
        lines += [f"{k:28s} {v:.3f}" for k, v in sorted(result["panel_agreement"].items())]
    return "\n".join(lines)


def _log_calibration(uri: str, experiment: str, rubric: Path, labels: Path, result: dict[str, Any]) -> str:
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=f"calibrate-{rubric.stem}", tags={"selftune.kind": "calibrate"})
    rid = run.info.run_id
    now = int(time.time() * 1000)
    metrics = []
    parts = [("calibrate", result["all"])]
    if "align" in result:
        parts += [("align/before", result["align"]["before"]), ("align/after", result["align"]["after"])]
    parts += [(f"member/{name}", agg) for name, agg in result.get("members", {}).items()]
    metrics += [Metric(f"panel/{k}", float(v), now, 0) for k, v in result.get("panel_agreement", {}).items()]
    for prefix, agg in parts:
        for name, a in agg.items():
            for key in ("kappa", "spearman", "exact_agreement"):
                if a[key] is not None:
                    metrics.append(Metric(f"{prefix}/{name}/{key}", float(a[key]), now, 0))
            for key in ("kappa_ci95", "spearman_ci95"):
                lo, hi = a[key]
                if lo is not None:
                    metrics += [Metric(f"{prefix}/{name}/{key}_low", float(lo), now, 0),
                                Metric(f"{prefix}/{name}/{key}_high", float(hi), now, 0)]
            metrics.append(Metric(f"{prefix}/{name}/n", float(a["n"]), now, 0))
    client.log_batch(rid, metrics=metrics)
    client.log_param(rid, "labels", str(labels))
    client.log_param(rid, "rubric", str(rubric))
    client.log_artifact(rid, str(rubric), "config")
    client.log_dict(rid, result, "agreement.json")
    client.log_text(rid, _calibration_text(result), "agreement.txt")
    client.set_terminated(rid, "FINISHED")
    return rid


def main() -> None:
    app()


if __name__ == "__main__":
    main()
