"""Command line. It parses arguments, calls the module that owns the work, and prints:

- ``selftune tune CONFIG``: probes, rounds, promotion, the held-out test report; all logged to MLflow;
- ``selftune eval CONFIG --questions Q --out F``: answer your own questions and score them;
- ``selftune judge --rubric R --items I --out F``: score any items against a rubric (no corpus);
- ``selftune calibrate --rubric R --labels L``: agreement of the judge with human labels;
- ``selftune ui [CONFIG]``: the MLflow UI on the config's store, offline-safe; prints the last tune's URL.

Bad input exits with code 2 and one line naming file, key and expectation; a tune stopped because a
role fails on too many items exits with code 3 and one line saying why.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .errors import InputError
from .runtime import progress, setup
from .spend import TuneStopped

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Tune RAG pipelines against your rubric.")


def _fail(err: InputError) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


@app.command()
def tune(config: Path, rounds: int = typer.Option(None, help="override optimizer.rounds"),
         corpus: Path = typer.Option(None, help="point the config at another folder of documents")) -> None:
    """Run the tuning loop: probes, rounds, promotion, held-out test report; all logged to MLflow."""
    from .config import load_config

    try:
        cfg = load_config(config, corpus)
        setup(cfg.workdir)
        from .loop import Session, tune as run_tune, write_best
        from .tracking import MlflowTracker

        from .runtime import TuneProgress

        session = Session(cfg)
        tracker = MlflowTracker(cfg)
        bars = TuneProgress()
        try:
            result = run_tune(session, cfg.optimizer.rounds if rounds is None else rounds, tracker, bars)
        finally:
            bars.close()
            session.close()
    except InputError as err:
        _fail(err)
    except KeyboardInterrupt:
        typer.echo("interrupted: finished rounds are kept in MLflow", err=True)
        raise typer.Exit(130) from None
    except TuneStopped as err:  # e.g. a role failing on too many items: one line, finished rounds kept
        typer.echo(f"stopped: {err}; finished rounds are kept in MLflow", err=True)
        raise typer.Exit(3) from None
    write_best(cfg.best_path(), result.best.params, getattr(session.sut, "demo_pool", None))
    from .tracking import report

    typer.echo(report(result))
    typer.echo(f"MLflow run: {tracker.parent_id}  (experiment '{cfg.tracking.experiment}', {cfg.tracking_uri()})")
    typer.echo(f"best params: {cfg.best_path()}")
    if tracker.report_dir is not None:
        typer.echo(f"report: {tracker.report_dir / 'report.html'}")


@app.command("eval")
def eval_(config: Path, questions: Path = typer.Option(..., help="JSONL: question, optional reference"),
          out: Path = typer.Option(..., help="where to write one JSON line per question"),
          corpus: Path = typer.Option(None, help="point the config at another folder of documents"),
          params: str = typer.Option("best", help="baseline | best | PATH to a params YAML")) -> None:
    """Answer your own questions with the pipeline and score them with the rubric."""
    from .config import initial_params, load_config, load_params

    try:
        cfg = load_config(config, corpus)
        setup(cfg.workdir)
        from .loop import Session, load_demos
        from .probes import load_user_probes

        probes = [p.model_copy(update={"split": "test"}) for p in load_user_probes(questions)]
        if not probes:
            raise InputError(questions, "", "no questions; expected one JSON object per line")
        if out.is_dir():
            raise InputError(out, "", "is a directory, expected a file to write the answers to")
        chosen = initial_params(cfg)
        if params != "baseline":
            path = cfg.best_path() if params == "best" else Path(params)
            if not path.exists():
                raise InputError(path, "", "no params file (run `selftune tune` first, or pass --params baseline)")
            chosen = load_params(path, cfg)
        session = Session(cfg)
        try:
            if params != "baseline":
                load_demos(session, path)
            ev = session.evaluate(chosen, probes, "test", progress)
        finally:
            session.close()
    except InputError as err:
        _fail(err)
    from .loop import eval_rows

    _write_jsonl(out, eval_rows(ev))
    overall = ev.overall()
    typer.echo(f"wrote {len(ev.judgments)} answers to {out} (overall {overall if overall is not None else 'n/a'})")


def _writable(out: Path) -> None:
    """Checked before any work, so nothing computed is lost to a bad --out."""
    if out.is_dir():
        raise InputError(out, "", "is a directory, expected a file to write to")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


@app.command("judge")
def judge_cmd(rubric: Path = typer.Option(..., help="rubric YAML"),
              items: Path = typer.Option(..., help="JSONL: question, answer, optional contexts, reference"),
              out: Path = typer.Option(..., help="where to write one JSON line per item"),
              config: Path = typer.Option(None, help="take the judge model from this config"),
              seed: int = 0) -> None:
    """Score any items against a rubric: no corpus, no index."""
    from .calibrate import judge_all, judgment_row, read_items
    from .runtime import judge_runtime

    try:
        _writable(out)
        rows = read_items(items)
        rt = judge_runtime(rubric, config, seed)
        try:
            judgments = judge_all(rt.judge, rows, progress)
        finally:
            rt.close()
    except InputError as err:
        _fail(err)
    _write_jsonl(out, [judgment_row(row, j) for row, j in zip(rows, judgments)])
    valid = sum(j.valid for j in judgments)
    typer.echo(f"wrote {len(judgments)} judgments to {out} ({valid} valid)")


@app.command()
def calibrate(rubric: Path = typer.Option(..., help="rubric YAML"),
              labels: Path = typer.Option(..., help="JSONL items with human `labels` per criterion"),
              config: Path = typer.Option(None, help="take the judge model and MLflow store from this config"),
              align: bool = typer.Option(False, help="use half the labels as calibration examples; "
                                                     "report before/after on the rest"),
              out: Path = typer.Option(None, help="also write the agreement report as JSON here"),
              seed: int = 0) -> None:
    """Agreement of the judge with human labels: Cohen's kappa and Spearman's rho with bootstrap
    95% intervals and the confusion table per criterion; logged to MLflow."""
    from .calibrate import calibration_text, read_items, run
    from .rubric import load_rubric
    from .runtime import judge_runtime

    try:
        if out is not None:
            _writable(out)
        rows = read_items(labels, load_rubric(rubric), need_labels=True)
        rt = judge_runtime(rubric, config, seed)
        try:
            result = {"labels": str(labels), **run(rt.judge, rows, align, seed, progress)}
        finally:
            rt.close()
    except InputError as err:
        _fail(err)
    from .tracking import log_calibration

    text = calibration_text(result)
    run_id = log_calibration(rt.tracking.uri, rt.tracking.experiment, rubric, labels, result, text)
    typer.echo(text)
    typer.echo(f"MLflow run: {run_id}  (experiment '{rt.tracking.experiment}', {rt.tracking.uri})")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2), encoding="utf-8")


@app.command()
def ui(config: Path = typer.Argument(None, help="run config (default: ./.selftune/mlflow.db)"),
       port: int = typer.Option(5000, help="port on 127.0.0.1 (0: any free port)")) -> None:
    """Open the config's MLflow store in the MLflow UI on 127.0.0.1 (offline-safe); print the URL of
    the last tune's parent run; stop the server on Ctrl-C."""
    from .ui import open_ui

    try:
        open_ui(config, port, typer.echo)
    except InputError as err:
        _fail(err)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
