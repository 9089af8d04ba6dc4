"""Schema of the run YAML. ``load_config(path)`` validates it; errors name file + key path.

Relative paths in the config (corpus, rubric, workdir) are resolved against the config file's folder,
so a config means the same thing from whatever directory it is run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import InputError, read_yaml, validate

ROLES = ("generator", "sut", "judge", "optimizer")


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSpec(Strict):
    """One role's model: ``local`` (the embedded SmolLM2 GGUF) or any LiteLLM model id."""

    model: str = "local"
    api_base: str | None = None
    api_key_env: str | None = Field(None, description="NAME of the env variable holding the key")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(128, ge=1, le=8192)
    cache: bool = True


class Models(Strict):
    generator: ModelSpec = ModelSpec(temperature=0.7, max_tokens=48)
    sut: ModelSpec = ModelSpec(max_tokens=80)
    judge: ModelSpec = ModelSpec(max_tokens=96)
    optimizer: ModelSpec = ModelSpec(temperature=0.7, max_tokens=120)


class CorpusSpec(Strict):
    path: Path
    glob: list[str] = ["**/*.md", "**/*.txt"]


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


ParamSpec = Annotated[IntParam | ChoiceParam | TextParam, Field(discriminator="type")]


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


class ProbeSpec(Strict):
    count: int = Field(30, ge=6, le=5000)
    split: SplitSpec = SplitSpec()
    file: Path | None = Field(None, description="optional JSONL of your own probes (question, reference)")
    max_attempts_factor: int = Field(4, ge=1, le=20)


class OptimizerSpec(Strict):
    rounds: int = Field(3, ge=0, le=200)
    worst_k: int = Field(4, ge=1, le=50)
    sampler: Literal["tpe", "random"] = "tpe"


class GateSpec(Strict):
    confidence: float = Field(0.9, gt=0.5, lt=1.0)
    resamples: int = Field(2000, ge=100, le=100000)
    min_gain: float = Field(0.0, ge=0.0, le=1.0)
    max_criterion_drop: float = Field(0.02, ge=0.0, le=1.0)


class TrustSpec(Strict):
    """The bar the judge must clear for its scores to steer promotion (else: checks only)."""

    max_flip_rate: float = Field(0.25, ge=0.0, le=1.0)
    min_swap_consistency: float = Field(0.6, ge=0.0, le=1.0)
    max_length_corr: float | None = Field(0.6, ge=0.0, le=1.0)
    min_agreement: float | None = Field(
        0.6, ge=0.0, le=1.0, description="with judge.models: the share of items on which the judges agree (pass/fail)")


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
    retest_sample: int = Field(8, ge=0, le=1000, description="items re-judged (cache bypassed) for test-retest")
    swap_sample: int = Field(6, ge=0, le=1000, description="validation probes compared in both orders per round")
    trust: TrustSpec = TrustSpec()

    @field_validator("models", mode="before")
    @classmethod
    def _ids(cls, v: object) -> object:
        return [{"model": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v


class TrackingSpec(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite in the workdir")
    experiment: str = "selftune"
    traces: bool = Field(True, description="log every judged item as an MLflow trace with its scores as assessments")


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
    })
    key = "corpus.path" if corpus is None else "--corpus"
    if not corpus_path.is_dir():
        raise InputError(path, key, f"expected an existing folder of documents, got {corpus_path}")
    if not cfg.rubric.is_file():
        raise InputError(path, "rubric", f"expected an existing rubric YAML file, got {cfg.rubric}")
    if cfg.probes.file is not None and not cfg.probes.file.is_file():
        raise InputError(path, "probes.file", f"expected an existing JSONL file, got {cfg.probes.file}")
    params = cfg.sut.params
    if cfg.sut.system == "builtin":
        for name in ("chunk_size", "chunk_overlap", "top_k"):
            spec = params[name]
            values = [spec.low, spec.high] if isinstance(spec, IntParam) else spec.choices
            if isinstance(spec, TextParam) or not all(isinstance(v, int) and v >= 0 for v in values):
                raise InputError(path, f"sut.params.{name}", "expected type int or choice of integers >= 0")
        if min(_values(params["chunk_size"])) <= max(_values(params["chunk_overlap"])):
            raise InputError(path, "sut.params.chunk_overlap",
                             "every chunk_overlap must be smaller than every chunk_size")
        if min(_values(params["top_k"])) < 1:
            raise InputError(path, "sut.params.top_k", "expected top_k >= 1")
    specs = [(f"models.{role}.model", getattr(cfg.models, role)) for role in ROLES]
    specs += [(f"judge.models.{i}.model", spec) for i, spec in enumerate(cfg.judge.models or [])]
    for key, spec in specs:
        if spec.model != "local" and "/" not in spec.model:
            raise InputError(path, key, f"expected 'local' or a LiteLLM id like 'openai/gpt-4o-mini', got {spec.model!r}")
    if cfg.judge.models and "judge" in cfg.models.model_fields_set:
        raise InputError(path, "judge.models", "name the judge once: either models.judge or a judge.models "
                                               "panel, not both (the panel's first model is the primary judge)")
    return cfg


def _values(spec: IntParam | ChoiceParam | TextParam) -> list[int]:
    if isinstance(spec, IntParam):
        return [spec.low, spec.high]
    return [int(v) for v in spec.choices]  # type: ignore[union-attr]


def initial_params(cfg: Config) -> dict[str, int | float | str]:
    return {name: spec.initial for name, spec in cfg.sut.params.items()}
