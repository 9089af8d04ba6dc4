"""What every command needs before it runs: an offline environment, logging, progress bars, and the
judge of commands that need no corpus (``judge``, ``calibrate``).

Offline by construction: nothing a command imports may reach a hub or a telemetry endpoint.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "False",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True", "RAGAS_DO_NOT_TRACK": "true", "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_ENABLE_ASYNC_LOGGING": "false", "DO_NOT_TRACK": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a refused resume reads the old config: one line, no bar
}
NOISY = ("httpx", "LiteLLM", "litellm", "chromadb", "sentence_transformers", "alembic", "mlflow", "dspy")


class _DropTruncated(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "response was truncated" not in record.getMessage()


def setup(workdir: Path | None = None) -> None:
    """Offline environment (unless the user set a variable), DSPy's cache in the workdir, logging."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    if workdir is not None:
        os.environ.setdefault("DSPY_CACHEDIR", str(workdir / "dspy_cache"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # max_tokens is tight on purpose (the small local model rambles): a cut reply is not news.
    logging.getLogger("dspy.clients.lm").addFilter(_DropTruncated())


def progress(iterable: Any, desc: str = "", total: int | None = None, leave: bool = True) -> Any:
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=leave, file=sys.stderr, dynamic_ncols=True)


class TuneProgress:
    """A ``progress`` for ``loop.tune``: the per-split bars of ``progress`` (left, below) under one
    overall bar, ``tune``, with an ETA over the whole tune, counted in items (probe attempts, answers).

    Its total is unknown until ``plan(items)`` (the loop calls it once the probes are split, with the
    items it expects to answer: the baseline's train minibatch and validation, validation once per
    candidate, test twice). Pruned candidates answer fewer, promoted ones a train minibatch more, and
    a baseline that stays best answers test once, so ``close()`` sets the total to the true count.
    Judge-only work (retest, swap checks) is not counted, so the ETA is a lower bound when those are
    large."""

    def __init__(self, file: Any = None):
        self.file = file if file is not None else sys.stderr
        self.overall: Any = None

    def _bar(self) -> Any:
        if self.overall is None:
            from tqdm import tqdm

            self.overall = tqdm(total=None, desc="tune", unit="item", position=0, file=self.file, dynamic_ncols=True)
        return self.overall

    def plan(self, items: int) -> None:
        bar = self._bar()
        bar.total = bar.n + items
        bar.refresh()

    def __call__(self, iterable: Any, desc: str = "", total: int | None = None, leave: bool = True) -> Any:
        from tqdm import tqdm

        overall = self._bar()
        with tqdm(iterable, desc=desc, total=total, leave=leave, position=1, file=self.file,
                  dynamic_ncols=True) as bar:
            for x in bar:
                yield x
                overall.update(1)

    def close(self) -> None:
        if self.overall is not None:
            self.overall.total = self.overall.n
            self.overall.refresh()
            self.overall.close()


@dataclass
class Tracking:
    """Where a command's MLflow runs go."""

    uri: str
    experiment: str


@dataclass
class JudgeRuntime:
    """A judge with no corpus behind it, where its runs are logged, and how to free its models."""

    rubric: Any
    judge: Any
    tracking: Tracking
    workdir: Path
    _close: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for f in self._close:
            f()


def judge_runtime(rubric_path: Path, config: Path | None, seed: int) -> JudgeRuntime:
    """The judge model(s) and tracking store of ``config`` if given; else the embedded model and
    ./.selftune. Bad input raises InputError before any model is loaded."""
    from .config import JudgeSpec, ModelSpec, load_config
    from .lm import Engines, check_credentials, panel_roles
    from .rubric import load_rubric

    rubric = load_rubric(rubric_path)
    if config is not None:
        cfg = load_config(config)
        check_credentials(cfg)
        specs, spec, embedder_name, workdir = cfg.judge_specs(), cfg.judge, cfg.embedder, cfg.workdir
        tracking = Tracking(cfg.tracking_uri(), cfg.tracking.experiment)
    else:
        specs, spec, embedder_name, workdir = [ModelSpec(model="local", max_tokens=40)], JudgeSpec(), "default", \
            Path(".selftune")
        tracking = Tracking(f"sqlite:///{(workdir / 'mlflow.db').resolve()}", "selftune")
    setup(workdir)
    from .judge import Judge

    engines = Engines(seed)
    roles = panel_roles(specs, engines) if rubric.needs_judge_model() else None
    embedder = None
    if any(c.metric == "answer_relevancy" for c in rubric.ragas_criteria()):
        from .index import Embedder

        embedder = Embedder(embedder_name)
    judge = Judge(rubric, roles, seed=seed, method=spec.method, flag_cap=spec.flag_cap, embedder=embedder,
                  aggregate=spec.aggregate)
    if judge.panel is not None:  # a judge that cannot score stops the command before any item
        from .panel import check_judges, judge_keys

        try:
            check_judges(judge.panel, next(iter(rubric.llm_criteria()), None), config or rubric_path,
                         judge_keys(cfg) if config is not None else ["judge"])
        except BaseException:
            engines.close()
            raise
    return JudgeRuntime(rubric, judge, tracking, workdir, [engines.close])
