"""Command line. It parses arguments, calls the module that owns the work, and prints:

- ``selftune tune CONFIG [--resume] [--workers N]``: probes, rounds, promotion, the held-out test report; all
  logged to MLflow; ``--resume`` continues the last unfinished tune of the config (``resume.py``); with N
  worker processes evaluating candidates (stage-2 draws, the tune's own proposals) through the shared study;
- ``selftune worker CONFIG``: evaluate candidates for a tune of CONFIG running elsewhere (``workers.py``);
- ``selftune eval CONFIG --questions Q --out F``: answer your own questions and score them;
- ``selftune judge --rubric R --items I --out F``: score any items against a rubric (no corpus);
- ``selftune calibrate --rubric R --labels L``: agreement of the judge with human labels;
- ``selftune review CONFIG --out F``: the last tune's worst answers, with fields for a person to fill;
- ``selftune feedback CONFIG --file F | --from-mlflow``: a person's edits and ratings back into the loop;
- ``selftune ui [CONFIG]``: the MLflow UI on the config's store, offline-safe; prints the last tune's URL.

Bad input exits with code 2 and one line naming file, key and expectation; a tune stopped because a
role fails on too many items exits with code 3 and one line saying why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
         corpus: Path = typer.Option(None, help="point the config at another folder of documents"),
         resume: bool = typer.Option(False, help="continue the last unfinished tune of this config in its MLflow "
                                                 "run (calls it made are read from the response cache)"),
         workers: int = typer.Option(0, min=0, max=64, help="evaluate candidates (stage-2 draws, the tune's "
                                                            "own proposals) in N local worker processes through "
                                                            "the shared study")) -> None:
    """Run the tuning loop: probes, rounds, promotion, held-out test report; all logged to MLflow.
    One tune per workdir: a second is refused. SIGTERM stops it like Ctrl-C (parent run KILLED)."""
    from .config import load_config
    from .workdir import WorkdirLock, exit_code, sigterm_as_interrupt

    lock = None
    try:
        with sigterm_as_interrupt():
            cfg = load_config(config, corpus)
            lock = WorkdirLock(cfg.workdir, f"tune {config}").acquire()
            setup(cfg.workdir)
            from .lm import check_credentials
            from .loop import Session, Workers, tune as run_tune, write_best
            from .resume import check_resume, last_unfinished, reap_stale
            from .runtime import TuneProgress
            from .tracking import MlflowTracker

            check_credentials(cfg)  # a missing key is reported before the store is touched
            for rid in reap_stale(cfg):
                typer.echo(f"marked KILLED: tune run {rid}, left RUNNING by a process that died", err=True)
            previous = last_unfinished(cfg) if resume else None
            if resume and previous is None:
                typer.echo(f"nothing to resume: the last tune of '{cfg.name}' in {cfg.workdir} finished (or there "
                           "is none); starting a new tune", err=True)
            if previous is not None:
                check_resume(cfg, previous)  # before any model is loaded
            session = Session(cfg)
            try:
                if previous is not None:
                    check_resume(cfg, previous, session.corpus.digest)
                    typer.echo(f"resuming tune run {previous.info.run_id} (stopped: "
                               f"{previous.data.tags.get('selftune.aborted', previous.info.status)})", err=True)
                tracker = MlflowTracker(cfg, resume=previous.info.run_id if previous is not None else None)
                bars = TuneProgress()
                try:
                    pool = Workers(workers, config if corpus is None else None) if workers else None
                    if pool is not None and corpus is not None:
                        raise InputError(config, "--corpus", "cannot be combined with --workers (workers read the "
                                                             "config)")
                    result = run_tune(session, cfg.optimizer.rounds if rounds is None else rounds, tracker, bars,
                                      pool)
                finally:
                    bars.close()
            finally:
                session.close()
            write_best(cfg.best_path(), result.best.params, getattr(session.sut, "demo_pool", None))
    except InputError as err:
        _fail(err)
    except KeyboardInterrupt as err:
        typer.echo(f"{'terminated (SIGTERM)' if exit_code(err) == 143 else 'interrupted'}: finished rounds are kept in "
                   "MLflow; `selftune tune CONFIG --resume` continues", err=True)
        raise typer.Exit(exit_code(err)) from None
    except TuneStopped as err:  # e.g. a role failing on too many items: one line, finished rounds kept
        typer.echo(f"stopped: {err}; finished rounds are kept in MLflow", err=True)
        raise typer.Exit(3) from None
    finally:
        if lock is not None:
            lock.release()
    from .tracking import report

    typer.echo(report(result))
    typer.echo(f"MLflow run: {tracker.parent_id}  (experiment '{cfg.tracking.experiment}', {cfg.tracking_uri()})")
    typer.echo(f"best params: {cfg.best_path()}")
    if tracker.report_dir is not None:
        typer.echo(f"report: {tracker.report_dir / 'report.html'}")


@app.command()
def worker(config: Path, id: int = typer.Option(0, "--id", help="this worker's number (offsets its sampler seed)"),
           max_candidates: int = typer.Option(None, help="stop after reporting this many candidates")) -> None:
    """Evaluate stage-2 candidates for a tune of CONFIG running elsewhere: ask the shared Optuna study
    (optimizer.storage) for a candidate, answer and judge train and validation, report; until the tune ends."""
    from .config import load_config

    try:
        cfg = load_config(config)
        setup(cfg.workdir)
        from .workers import run_worker

        n = run_worker(cfg, id, max_candidates=max_candidates)
    except InputError as err:
        _fail(err)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    typer.echo(f"worker {id}: reported {n} candidates")


@app.command("eval")
def eval_(config: Path, questions: Path = typer.Option(..., help="JSONL: question, optional reference"),
          out: Path = typer.Option(..., help="where to write one JSON line per question"),
          corpus: Path = typer.Option(None, help="point the config at another folder of documents"),
          params: str = typer.Option("best", help="baseline | best | PATH to a params YAML")) -> None:
    """Answer your own questions with the pipeline and score them with the rubric."""
    from .config import initial_params, load_config, load_params

    from .workdir import WorkdirLock

    lock = None
    try:
        cfg = load_config(config, corpus)
        lock = WorkdirLock(cfg.workdir, f"eval {config}").acquire()  # it may build index collections
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
    finally:
        if lock is not None:
            lock.release()
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
def review(config: Path, out: Path = typer.Option(..., help="review file to write (.jsonl; a .csv beside it)"),
           round_: int = typer.Option(None, "--round", help="round of the last tune (default: its best)"),
           worst: int = typer.Option(20, help="how many of the lowest-scored items")) -> None:
    """Write the worst-scored answers of the last tune for a person to correct and rate."""
    from .config import load_config
    from .feedback import review_rows, write_review
    from .rubric import load_rubric

    try:
        cfg = load_config(config)
        _writable(out)
        rubric = load_rubric(cfg.rubric)
        rows = review_rows(cfg.tracking_uri(), cfg.tracking.experiment, rubric, round_, worst)
        jsonl, csv_path = write_review(rows, out, rubric)
    except InputError as err:
        _fail(err)
    typer.echo(f"wrote {len(rows)} items to review to {jsonl} and {csv_path}; fill in edited_answer, the ratings "
               f"and comment, then: selftune feedback {config} --file <that file>")


@app.command()
def feedback(config: Path, file: Path = typer.Option(None, help="a filled-in review file (JSONL or CSV)"),
             from_mlflow: bool = typer.Option(False, "--from-mlflow",
                                              help="pull human assessments added on the items' traces")) -> None:
    """Take a person's edits and ratings in: edited answers become human references, ratings labels."""
    from .config import load_config
    from .feedback import from_mlflow as pull, ingest, read_feedback
    from .rubric import load_rubric

    errors: list[InputError] = []
    try:
        cfg = load_config(config)
        if (file is None) == (not from_mlflow):
            raise InputError(config, "--file", "expected either --file FILE or --from-mlflow")
        rubric = load_rubric(cfg.rubric)
        if file is not None:
            rows, errors = read_feedback(file, rubric)
        else:
            rows, problems = pull(cfg.tracking_uri(), cfg.tracking.experiment, cfg.workdir, rubric)
            for p in problems:
                typer.echo(f"warning: {p}", err=True)
        counts = ingest(cfg.tracking_uri(), cfg.tracking.experiment, cfg.workdir, rows, file, len(errors))
    except InputError as err:
        _fail(err)
    typer.echo(f"kept {counts['feedback/rows']} rows in {cfg.workdir / 'feedback'}: {counts['feedback/edits']} "
               f"edited answers (human references from the next tune), {counts['feedback/ratings']} rated "
               f"(labels for `calibrate --feedback`), {counts['feedback/comments']} comments; "
               f"MLflow run {counts['feedback_run']}")
    if errors:
        for err in errors:
            typer.echo(f"error: {err}", err=True)
        typer.echo(f"{len(errors)} malformed rows were not taken (the good rows above are kept)", err=True)
        raise typer.Exit(2)


@app.command()
def calibrate(rubric: Path = typer.Option(..., help="rubric YAML"),
              labels: Path = typer.Option(None, help="JSONL items with human `labels` per criterion"),
              use_feedback: bool = typer.Option(False, "--feedback", help="also use the ratings and edited "
                                                                          "answers given with `selftune feedback` "
                                                                          "(needs --config)"),
              config: Path = typer.Option(None, help="take the judge model and MLflow store from this config"),
              align: bool = typer.Option(False, help="use half the labels (and of the edit pairs) as "
                                                     "calibration examples; report before/after on the rest"),
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
        rows = read_items(labels, load_rubric(rubric), need_labels=True) if labels is not None else []
        n_fed, pairs = 0, []
        if use_feedback:
            fed, pairs = _feedback_labels(config)
            before = len(rows)
            if fed is not None:
                rows += read_items(fed, load_rubric(rubric), need_labels=True)
            n_fed, labels = len(rows) - before, labels or fed
        if not rows and not pairs:
            raise InputError(rubric, "--labels", "expected a labels file, or --feedback with --config")
        rt = judge_runtime(rubric, config, seed)
        try:
            result = {"labels": str(labels), "feedback_items": n_fed, "feedback_pairs": len(pairs),
                      **run(rt.judge, rows, align, seed, progress, pairs)}
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


def _feedback_labels(config: Path | None) -> tuple[Path | None, list[dict[str, Any]]]:
    """The ratings from `selftune feedback` as a labels file in the workdir (``feedback/feedback-labels.jsonl``;
    None if there are none), and the (original, edited) answer pairs it kept."""
    from .config import load_config
    from .feedback import calibration_rows, feedback_pairs

    if config is None:
        raise InputError("--feedback", "--config", "expected --config CONFIG (whose workdir holds the feedback)")
    cfg = load_config(config)
    rows, pairs = calibration_rows(cfg.workdir), feedback_pairs(cfg.workdir)
    if not rows and not pairs:
        raise InputError(cfg.workdir / "feedback", "ratings", "no rated or edited answers yet; run `selftune "
                                                              "feedback` first")
    if not rows:
        return None, pairs
    path = cfg.workdir / "feedback" / "feedback-labels.jsonl"
    _write_jsonl(path, rows)
    return path, pairs


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
