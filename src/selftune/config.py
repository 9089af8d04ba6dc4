"""Schema of the run YAML. ``load_config(path)`` validates it; errors name file + key path.

Relative paths in the config (corpus, rubric, workdir) are resolved against the config file's folder,
so a config means the same thing from whatever directory it is run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import InputError, read_yaml, validate
from .records import Params

ROLES = ("generator", "sut", "judge", "optimizer")


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RoleBudget(Strict):
    """A cap on what one role may spend in a tune. Unset: no cap."""

    calls: int | None = Field(None, ge=1, description="LM calls (cached ones included, so a rerun stops where the "
                                                      "first run did)")
    tokens: int | None = Field(None, ge=1, description="prompt + completion tokens the provider reported (billed "
                                                       "calls only: a response-cache hit costs none)")
    usd: float | None = Field(None, gt=0, description="US dollars at LiteLLM's offline price map (billed calls only; "
                                                      "the local model costs 0)")


class ModelSpec(Strict):
    """One role's model: ``local`` (the embedded SmolLM2 GGUF) or any LiteLLM model id."""

    model: str = "local"
    api_base: str | None = None
    api_key_env: str | None = Field(None, description="NAME of the env variable holding the key")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(128, ge=1, le=8192)
    cache: bool = True
    adapter: Literal["auto", "chat", "plain"] = Field(
        "auto", description="how DSPy prompts it: chat (field markers, JSON fallback) or plain (a plain prompt, the "
                            "reply is the answer); auto: plain for local and for an openai/ id with api_base")
    concurrency: int | None = Field(
        None, ge=1, le=256, description="calls in flight at once for a split's answers, judgments and probe "
                                        "questions (results and order as if sequential); default 8 hosted, 1 local "
                                        "(llama.cpp runs one call at a time: it must stay 1)")
    retries: int = Field(3, ge=0, le=20, description="retries of a failed call (429, 5xx, timeout, dropped "
                                                     "connection, unparsable reply) with exponential backoff "
                                                     "(1, 2, 4 ... s) or the server's Retry-After; then the item "
                                                     "is invalid (counted, never scored 0)")
    timeout: float = Field(120.0, gt=0, le=3600, description="seconds to wait for a reply (hosted and served models)")
    max_retry_wait: float = Field(60.0, ge=0, le=3600, description="served models (api_base): the longest "
                                                                    "Retry-After honoured before a retry")
    max_failed_share: float = Field(
        0.5, ge=0.0, le=1.0, description="share of a split's items on which this role's calls may fail (after "
                                         "retries) before the tune stops with a one-line reason; finished rounds "
                                         "stay in MLflow")
    budget: RoleBudget = RoleBudget()

    def workers(self) -> int:
        """Calls in flight at once: the configured concurrency, else 8 hosted, 1 local."""
        return self.concurrency or (1 if self.model == "local" else 8)


class LocalSpec(Strict):
    """The embedded llama.cpp model (every role whose model is ``local``)."""

    threads: int | None = Field(
        None, ge=1, le=512, description="CPU threads llama.cpp uses (n_threads and n_threads_batch); default every "
                                        "core (os.cpu_count()). Fewer leave cores to other jobs: llama.cpp's threads "
                                        "spin while they wait, so a tune beside other heavy work slows far more "
                                        "than twofold unless it leaves them room")


class Models(Strict):
    generator: ModelSpec = ModelSpec(temperature=0.7, max_tokens=48)
    sut: ModelSpec = ModelSpec(max_tokens=80)
    judge: ModelSpec = ModelSpec(max_tokens=96)
    optimizer: ModelSpec = ModelSpec(temperature=0.7, max_tokens=120)
    local: LocalSpec = LocalSpec()


def _relative_glob(g: str) -> str:
    if not g.strip() or g.startswith(("/", "~")) or ".." in g.split("/"):
        raise ValueError("expected a pattern relative to corpus.path (no leading '/' or '..')")
    return g


class CorpusSpec(Strict):
    path: Path
    glob: list[Annotated[str, AfterValidator(_relative_glob)]] = Field(["**/*.md", "**/*.txt"], min_length=1)
    follow_symlinks: bool = Field(False, description="read links that resolve outside `path` (off: skipped)")
    max_file_mb: float = Field(20.0, gt=0, le=100_000, description="larger documents are skipped and reported")


class IntParam(Strict):
    type: Literal["int"]
    low: int
    high: int
    initial: int

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        if not self.low <= self.initial <= self.high:
            raise ValueError(f"`low <= initial <= high` must hold, but got "
                             f"(low={self.low}, initial={self.initial}, high={self.high})")
        return self


class FloatParam(Strict):
    type: Literal["float"]
    low: float
    high: float
    initial: float

    @model_validator(mode="after")
    def _range(self) -> FloatParam:
        if not self.low <= self.initial <= self.high:
            raise ValueError(f"`low <= initial <= high` must hold, but got "
                             f"(low={self.low}, initial={self.initial}, high={self.high})")
        return self


class ChoiceParam(Strict):
    type: Literal["choice"]
    choices: list[int | float | str] = Field(min_length=1)
    initial: int | float | str

    @model_validator(mode="after")
    def _member(self) -> ChoiceParam:
        if self.initial not in self.choices:
            raise ValueError(f"`initial` must be one of {self.choices}, but got {self.initial!r}")
        return self


class TextParam(Strict):
    type: Literal["text"]
    initial: str = Field(min_length=1)
    max_chars: int = Field(800, ge=20)


ParamSpec = Annotated[IntParam | FloatParam | ChoiceParam | TextParam, Field(discriminator="type")]
# Optional params of the builtin RAG (absent = today's behaviour): name -> (lowest, highest, integers only).
BUILTIN_OPTIONAL: dict[str, tuple[float, float, bool]] = {
    "hybrid_weight": (0.0, 1.0, False), "demos": (0, 16, True), "max_tokens": (1, 8192, True),
    "temperature": (0.0, 2.0, False), "repeat_penalty": (1.0, 2.0, False),
    "frequency_penalty": (-2.0, 2.0, False), "presence_penalty": (-2.0, 2.0, False),
}


class SutSpec(Strict):
    system: str = Field("builtin", description="'builtin' or 'module:attr' of an object with answer()")
    params: dict[str, ParamSpec]

    @model_validator(mode="after")
    def _builtin_needs(self) -> SutSpec:
        if self.system == "builtin":
            need = {"instructions", "top_k", "chunk_size", "chunk_overlap"}
            missing = sorted(need - set(self.params))
            if missing:
                raise ValueError(f"the builtin RAG system needs params {sorted(need)}; missing {missing}")
            if not isinstance(self.params["instructions"], TextParam):
                raise ValueError("params.instructions must have type: text")
        return self


class SplitSpec(Strict):
    train: float = Field(0.4, gt=0)
    val: float = Field(0.3, gt=0)
    test: float = Field(0.3, gt=0)


class Persona(Strict):
    name: str = Field(min_length=1, max_length=60, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = Field(min_length=1, max_length=300,
                             description="who asks, in a few words: the generator is told to write as them")


class ProbeSpec(Strict):
    count: int = Field(30, ge=6, le=5000)
    split: SplitSpec = SplitSpec()
    file: Path | None = Field(None, description="optional JSONL of your own probes (question, reference)")
    max_attempts_factor: int = Field(4, ge=1, le=20)
    mix: dict[str, float] = Field(
        {"single": 1.0}, description="share of each probe kind (normalized): single, multi, comparison, procedural, "
                                     "unanswerable, vague, misspelled, keyword")
    personas: list[Persona] = Field([], description="who asks: each probe is written for one persona (seeded draw)")
    dedup_similarity: float = Field(0.92, gt=0.0, le=1.0, description="questions at least this cosine-similar "
                                                                      "(all-MiniLM) to a kept one are dropped, "
                                                                      "also across splits")
    mine: int = Field(0, ge=0, le=100, description="failure mining: new train probes per round, made near the "
                                                   "incumbent's worst train items (same documents, same kinds)")

    @field_validator("mix")
    @classmethod
    def _kinds(cls, v: dict[str, float]) -> dict[str, float]:
        from .records import KINDS

        for k, w in v.items():
            if k not in KINDS:
                raise ValueError(f"unknown probe kind {k!r}; expected some of {list(KINDS)}")
            if not (isinstance(w, int | float) and w >= 0):
                raise ValueError(f"the share of {k!r} must be a number >= 0, got {w!r}")
        if not v or sum(v.values()) <= 0:
            raise ValueError("expected at least one kind with a share > 0")
        return v

    @field_validator("personas")
    @classmethod
    def _unique(cls, v: list[Persona]) -> list[Persona]:
        names = [p.name for p in v]
        if len(set(names)) != len(names):
            raise ValueError(f"persona names must be unique, got {names}")
        return v


class BudgetSpec(Strict):
    """What a whole tune may spend (every role together); a role's own cap is ``models.<role>.budget``. Each is
    checked before every call; reaching one ends the tune after the current candidate (the held-out test of the
    best so far is still run, so the report holds), the report saying which cap and every finished round kept."""

    calls: int | None = Field(1500, ge=1, description="LM calls a tune may make (every role, cached calls "
                                                      "included); reaching it ends the tune after that candidate")
    tokens: int | None = Field(None, ge=1, description="prompt + completion tokens (billed calls only)")
    usd: float | None = Field(None, gt=0, description="US dollars at LiteLLM's offline price map (billed calls only)")
    minutes: float | None = Field(None, gt=0, le=100000, description="wall time a tune may take (Optuna's "
                                  "`timeout`): no candidate is started that would, with the held-out test still "
                                  "to score, end the tune after it; measured from the start of the tune")


class OptimizerSpec(Strict):
    rounds: int = Field(12, ge=0, le=500, description="at most this many candidates (the budget may stop sooner)")
    worst_k: int = Field(4, ge=1, le=50)
    sampler: Literal["tpe", "random"] = "tpe"
    budget: BudgetSpec = BudgetSpec()
    train_items: int | None = Field(16, ge=2, description="train probes answered per incumbent: the minibatch "
                                                           "whose failures the rewriter sees and demos come from")
    slices: list[int] = Field([10, 20], description="validation items after which a clearly losing candidate "
                                                    "is pruned")
    carry: float = Field(0.4, gt=0.0, le=1.0, description="share of the retrieval settings (best cheap score "
                                                           "first) carried from stage 1 to stage 2")
    parent: Literal["auto", "best", "pareto"] = Field(
        "auto", description="which pool text a rewrite mutates: best validation mean, or a draw from the Pareto "
                            "front over items (GEPA's way); auto: pareto with a hosted optimizer model, else best")
    gepa_calls: int = Field(40, ge=1, le=100000, description="hosted optimizer model: train items a rewrite's GEPA run "
                                                             "may evaluate (max_metric_calls, pool re-uses included)")
    storage: str | None = Field(
        None, description="where the search's Optuna study lives: an RDB URL (sqlite:///study.db, "
                          "postgresql://user@host/db) or a journal file path; the study is named from the config, "
                          "so a restarted tune continues it and several processes share it (default: in memory)")

    heartbeat: int = Field(60, ge=1, le=86400, description="with an RDB storage: seconds between the heartbeats of "
                                                         "a process evaluating a candidate; one silent for two "
                                                         "intervals is failed and its candidate re-queued once")

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("expected an Optuna storage URL (sqlite:///..., postgresql://...) or a journal file path")
        return v


class GateSpec(Strict):
    confidence: float = Field(0.9, gt=0.5, lt=1.0)
    resamples: int = Field(2000, ge=100, le=100000)
    min_gain: float = Field(0.0, ge=0.0, le=1.0)
    max_criterion_drop: float = Field(0.02, ge=0.0, le=1.0)


class TrustSpec(Strict):
    """The bar the judge must clear for its scores to steer promotion (else: checks only). A judge is
    *unproven* (and steers nothing either) until test-retest, position consistency, discrimination
    and, with ``labels``, agreement with them rest on at least ``min_items`` items each."""

    min_valid: float = Field(0.95, ge=0.0, le=1.0,
                             description="per model-scored criterion: share of items validly scored")
    min_items: int = Field(10, ge=1, le=10000, description="items a figure must rest on before it counts")
    max_flip_rate: float = Field(0.25, ge=0.0, le=1.0)
    min_swap_consistency: float = Field(0.6, ge=0.0, le=1.0)
    min_spread: float = Field(
        0.05, ge=0.0, le=0.5, description="per LLM criterion: SD of its [0, 1] scores across items (below: says the "
                                          "same thing to everything)")
    min_discrimination: float = Field(
        0.2, ge=-1.0, le=1.0, description="per LLM criterion: Spearman's rho with each signal it `tracks` "
                                          "(reference agreement, retrieval hit)")
    max_length_corr: float | None = Field(0.6, ge=0.0, le=1.0)
    min_agreement: float | None = Field(
        0.6, ge=0.0, le=1.0, description="with judge.models: the share of items on which the judges agree (pass/fail)")
    labels: Path | None = Field(None, description="JSONL of human-labelled items (as for `selftune calibrate`)")
    min_kappa: float = Field(0.4, ge=-1.0, le=1.0, description="with labels: Cohen's kappa per labelled LLM criterion")


class JudgeSpec(Strict):
    """How LLM criteria are scored. ``logprobs``: rationale, then the expected score under the
    probabilities of the scale tokens (G-Eval); ``json``: rationale and score as one JSON object
    (schema-constrained on the local model). ``auto``: logprobs on the local model, json on hosted."""

    models: list[ModelSpec] | None = Field(
        None, min_length=1, max_length=5,
        description="a panel of judges (instead of models.judge): each scores every LLM criterion; "
                    "a LiteLLM id string is short for {model: id}")
    aggregate: Literal["mean", "median", "min"] = Field("mean", description="how a panel's scores combine")
    method: Literal["auto", "logprobs", "json"] = "auto"
    mode: Literal["pointwise", "pairwise"] = Field(
        "pointwise", description="pairwise: LLM criteria promote by candidate-vs-incumbent comparisons in both orders")
    flag_cap: float | None = Field(0.0, ge=0.0, le=1.0, description="cap on an answer flagged as gaming the judge")
    retest_sample: int = Field(10, ge=0, le=1000, description="items re-judged (a second sample) for test-retest")
    swap_sample: int = Field(6, ge=0, le=1000, description="validation probes compared in both orders per round")
    monitor_sample: int = Field(8, ge=0, le=1000, description="below the trust bar, items per evaluation the judge "
                                                             "model still scores (to keep measuring it)")
    trust: TrustSpec = TrustSpec()

    @field_validator("models", mode="before")
    @classmethod
    def _ids(cls, v: object) -> object:
        return [{"model": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v


class TrackingSpec(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite in the workdir")
    experiment: str = "selftune"
    traces: bool = Field(True, description="log every judged item as an MLflow trace with its scores as assessments")


class IndexSpec(Strict):
    server: str | None = Field(None, description="a chroma server (`chroma run`) as http://host:port: collections "
                                                 "keyed as in the local store, so machines share what one embedded "
                                                 "(default: a local store in the workdir)")

    @field_validator("server")
    @classmethod
    def _server(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from urllib.parse import urlsplit

        u = urlsplit(v)
        try:
            port = u.port
        except ValueError:
            port = None
        if u.scheme not in ("http", "https") or not u.hostname or port is None or u.path not in ("", "/"):
            raise ValueError(f"expected http://host:port of a chroma server, got {v!r}")
        return v


class Config(Strict):
    name: str = "selftune"
    seed: int = 0
    workdir: Path = Path(".selftune")
    corpus: CorpusSpec
    embedder: str = Field("default", description="'default' (bundled all-MiniLM-L6-v2) or a path/name")
    models: Models = Models()
    rubric: Path
    probes: ProbeSpec = ProbeSpec()
    sut: SutSpec
    optimizer: OptimizerSpec = OptimizerSpec()
    gate: GateSpec = GateSpec()
    judge: JudgeSpec = JudgeSpec()
    tracking: TrackingSpec = TrackingSpec()
    index: IndexSpec = IndexSpec()
    # Set by load_config: where this config came from (for error messages and artifacts).
    source: Path | None = None

    def judge_specs(self) -> list[ModelSpec]:
        """The judge panel: ``judge.models`` if given, else ``models.judge`` alone."""
        return list(self.judge.models) if self.judge.models else [self.models.judge]

    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{(self.workdir / 'mlflow.db').resolve()}"

    def best_path(self) -> Path:
        """Where ``selftune tune`` keeps the params it promoted last (``eval --params best``)."""
        return self.workdir / "best" / f"{self.name}.yaml"


def load_config(path: str | Path, corpus: str | Path | None = None) -> Config:
    """Read and validate a run config; ``corpus`` overrides ``corpus.path`` (CLI ``--corpus``)."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise InputError(path, "", "expected a mapping at the top level")
    data = dict(data, source=str(path))
    cfg = validate(Config, data, path)
    base = path.resolve().parent

    def rel(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    corpus_path = Path(corpus).resolve() if corpus is not None else rel(cfg.corpus.path)
    cfg = cfg.model_copy(update={
        "workdir": rel(cfg.workdir), "rubric": rel(cfg.rubric),
        "corpus": cfg.corpus.model_copy(update={"path": corpus_path}),
        "probes": cfg.probes.model_copy(update={"file": rel(cfg.probes.file) if cfg.probes.file else None}),
        "judge": cfg.judge.model_copy(update={"trust": cfg.judge.trust.model_copy(
            update={"labels": rel(cfg.judge.trust.labels) if cfg.judge.trust.labels else None})}),
    })
    key = "corpus.path" if corpus is None else "--corpus"
    if not corpus_path.is_dir():
        raise InputError(path, key, f"expected an existing folder of documents, got {corpus_path}")
    if not cfg.rubric.is_file():
        raise InputError(path, "rubric", f"expected an existing rubric YAML file, got {cfg.rubric}")
    if cfg.judge.trust.labels is not None and not cfg.judge.trust.labels.is_file():
        raise InputError(path, "judge.trust.labels", f"expected an existing JSONL file, got {cfg.judge.trust.labels}")
    if cfg.probes.file is not None and not cfg.probes.file.is_file():
        raise InputError(path, "probes.file", f"expected an existing JSONL file, got {cfg.probes.file}")
    params = cfg.sut.params
    for name, spec in params.items():
        problem = param_problem(spec, spec.initial)
        if problem:
            raise InputError(path, f"sut.params.{name}.initial", problem)
    clash = cross_field_problem(initial_params(cfg))
    if clash:
        raise InputError(path, f"sut.params.{clash[0]}.initial", clash[1])
    if cfg.sut.system == "builtin":
        for name in ("chunk_size", "chunk_overlap", "top_k"):
            spec = params[name]
            values = [spec.low, spec.high] if isinstance(spec, IntParam | FloatParam) else getattr(spec, "choices", [])
            if isinstance(spec, TextParam | FloatParam) or not all(isinstance(v, int) and v >= 0 for v in values):
                raise InputError(path, f"sut.params.{name}", "expected type int or choice of integers >= 0")
        if min(_values(params["chunk_size"])) <= max(_values(params["chunk_overlap"])):
            raise InputError(path, "sut.params.chunk_overlap",
                             "every chunk_overlap must be smaller than every chunk_size")
        if min(_values(params["top_k"])) < 1:
            raise InputError(path, "sut.params.top_k", "expected top_k >= 1")
        for name, (lo, hi, whole) in BUILTIN_OPTIONAL.items():
            if name in params:
                _check_optional(path, name, params[name], lo, hi, whole)
        if "repeat_penalty" in params and cfg.models.sut.model != "local":
            raise InputError(path, "sut.params.repeat_penalty",
                             "repeat_penalty is the local (llama.cpp) model's; "
                             "for a hosted sut use frequency_penalty or presence_penalty")
    if cfg.embedder != "default" and cfg.embedder.startswith(("/", "./", "../", "~")):
        where = Path(cfg.embedder).expanduser()
        where = where if where.is_absolute() else (base / where).resolve()
        if not where.is_dir():
            raise InputError(path, "embedder", f"expected 'default' or an existing sentence-transformers folder, "
                                               f"got {cfg.embedder}")
        cfg = cfg.model_copy(update={"embedder": str(where)})
    specs = [(f"models.{role}.model", getattr(cfg.models, role)) for role in ROLES]
    specs += [(f"judge.models.{i}.model", spec) for i, spec in enumerate(cfg.judge.models or [])]
    for key, spec in specs:
        if spec.model != "local" and "/" not in spec.model:
            raise InputError(path, key,
                             f"expected 'local' or a LiteLLM id like 'openai/gpt-4o-mini', got {spec.model!r}")
        where = key.rsplit(".", 1)[0]
        if spec.model == "local" and (spec.concurrency or 1) > 1:
            raise InputError(path, f"{where}.concurrency", "expected 1 (or no key) for the local model: llama.cpp "
                                                           "runs one call at a time")
        if spec.budget.usd is not None:
            from .spend import prices

            if prices(spec.model) is None:
                raise InputError(path, f"{where}.budget.usd",
                                 f"expected a model LiteLLM's offline price map knows; {spec.model} has no price "
                                 "(cap calls or tokens instead)")
    if cfg.judge.models and "judge" in cfg.models.model_fields_set:
        raise InputError(path, "judge.models", "name the judge once: either models.judge or a judge.models "
                                               "panel, not both (the panel's first model is the primary judge)")
    return cfg


def _values(spec: IntParam | FloatParam | ChoiceParam | TextParam) -> list[int]:
    if isinstance(spec, IntParam | FloatParam):
        return [int(spec.low), int(spec.high)]
    return [int(v) for v in spec.choices]  # type: ignore[union-attr]


def _check_optional(path: Path, name: str, spec: IntParam | FloatParam | ChoiceParam | TextParam,
                    lo: float, hi: float, whole: bool) -> None:
    kinds = "int or choice of integers" if whole else "int, float or choice of numbers"
    values = [spec.low, spec.high] if isinstance(spec, IntParam | FloatParam) else getattr(spec, "choices", [])
    numeric = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if isinstance(spec, TextParam) or (whole and isinstance(spec, FloatParam)) or len(numeric) != len(values) \
            or (whole and not all(float(v).is_integer() for v in numeric)):
        raise InputError(path, f"sut.params.{name}", f"expected type {kinds}")
    if not all(lo <= v <= hi for v in numeric):
        raise InputError(path, f"sut.params.{name}", f"expected values in [{lo:g}, {hi:g}], got {values}")


def initial_params(cfg: Config) -> Params:
    return {name: spec.initial for name, spec in cfg.sut.params.items()}


def param_problem(spec: IntParam | FloatParam | ChoiceParam | TextParam, value: object) -> str | None:
    """What a value of this param must be, if ``value`` is not that; None if it is."""
    if isinstance(spec, FloatParam):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and spec.low <= value <= spec.high
        return None if ok else f"expected a number in [{spec.low:g}, {spec.high:g}], got {value!r}"
    if isinstance(spec, IntParam):
        ok = isinstance(value, int) and not isinstance(value, bool) and spec.low <= value <= spec.high
        return None if ok else f"expected an integer in [{spec.low}, {spec.high}], got {value!r}"
    if isinstance(spec, ChoiceParam):
        # type-exact: YAML's `true` is not the choice 1, nor "1" the choice 1
        ok = any(type(value) is type(c) and value == c for c in spec.choices)
        return None if ok else f"expected one of {spec.choices}, got {value!r}"
    if not isinstance(value, str) or not value.strip():
        return f"expected non-empty text, got {value!r:.80}"
    if len(value) > spec.max_chars:
        return f"expected text of at most {spec.max_chars} characters (max_chars), got {len(value)}"
    return None


def cross_field_problem(values: Params) -> tuple[str, str] | None:
    """(param name, what was expected) when params that must agree do not: overlap < chunk size."""
    size, overlap = values.get("chunk_size"), values.get("chunk_overlap")
    if isinstance(size, int) and isinstance(overlap, int) and not 0 <= overlap < size:
        return "chunk_overlap", f"expected 0 <= chunk_overlap < chunk_size, got {overlap} and chunk_size {size}"
    return None


def load_params(path: str | Path, cfg: Config) -> Params:
    """The params a params YAML (``{params: {name: value}}``, as ``selftune tune`` writes to
    ``<workdir>/best/<name>.yaml``) sets, over the config's initial params (a file may set only some).
    Every value is checked against ``cfg.sut.params``: known name, type, int range, choice, text
    length, and cross-field rules (chunk_overlap < chunk_size). Anything else is an InputError naming
    the file and ``params.<name>``; nothing is loaded or built, so it can run before any model."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise InputError(path, "params", "expected a mapping `params: {name: value}`")
    extra = sorted(str(k) for k in data if k != "params")
    if extra:
        raise InputError(path, extra[0], "unknown key; expected only `params`")
    specs = cfg.sut.params
    chosen: Params = initial_params(cfg)
    for name, value in data["params"].items():
        if name not in specs:
            raise InputError(path, f"params.{name}", f"unknown param; expected one of {sorted(specs)}")
        problem = param_problem(specs[name], value)
        if problem:
            raise InputError(path, f"params.{name}", problem)
        chosen[name] = value
    clash = cross_field_problem(chosen)
    if clash:
        raise InputError(path, f"params.{clash[0]}", clash[1])
    return chosen
