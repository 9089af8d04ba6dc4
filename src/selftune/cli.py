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


def _setup(workdir: Path | None = None) -> None:
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    if workdir is not None:
        os.environ.setdefault("DSPY_CACHEDIR", str(workdir / "dspy_cache"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "LiteLLM", "litellm", "chromadb", "sentence_transformers", "alembic", "mlflow", "dspy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    from .config import initial_params, load_config
    from .errors import read_yaml

    try:
        cfg = load_config(config, corpus)
        _setup(cfg.workdir)
        from .loop import Session
        from .probes import load_user_probes

        if not questions.is_file():
            raise InputError(questions, "", "file not found")
        probes = [p.model_copy(update={"split": "test"}) for p in load_user_probes(questions)]
        chosen = dict(initial_params(cfg))
        if params != "baseline":
            path = best_path(cfg) if params == "best" else Path(params)
            if not path.is_file():
                raise InputError(path, "", "no params file (run `selftune tune` first, or pass --params baseline)")
            data = read_yaml(path)
            if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
                raise InputError(path, "params", "expected a mapping of param name to value")
            unknown = sorted(set(data["params"]) - set(chosen))
            if unknown:
                raise InputError(path, f"params.{unknown[0]}", f"unknown param; expected one of {sorted(chosen)}")
            chosen.update(data["params"])
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
