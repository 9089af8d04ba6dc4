"""The LLM panel: one judge model, or several, scoring LLM criteria and comparing answers.

Each member scores every LLM criterion (or criterion group: one structured output per item, a
rationale before each score); the members' scores combine by ``aggregate`` (mean, median or min, the
strictest) and each member's raw score is kept in ``Score.by_judge``. Two methods, per member:

- ``logprobs`` (default on the embedded model): the judge writes a one-sentence rationale, then the
  score is the expectation of the scale levels under the next-token probabilities after
  ``Score (lo-hi): `` (G-Eval). One forward pass, no sampling, always a valid score.
- ``json``: rationale and score as one JSON object (schema-constrained on the embedded model,
  parsed leniently from a hosted model).

Pairwise: which of two answers better meets a criterion, P(first wins) averaged over the members.
A reply with no usable score is ``None`` here and recorded ``invalid`` by the grader (never 0).
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from dspy.lm15 import Config as LMConfig
from dspy.lm15 import Message, Request

from .errors import InputError
from .hosted import format_refused, json_modes
from .lm import Role, ask_json, parse_json_object
from .prompts import PAIR_SCHEMA, criterion_prompt, group_schema, pairwise_prompt, score_schema
from .records import Answer, Chunk, Probe, Score
from .rubric import LLMCriterion, Scale

log = logging.getLogger(__name__)
_SCORE = re.compile(r"score\"?\s*[:=]\s*\**\s*(\d+)", re.I)
_RATIONALE = re.compile(r"rationale\s*:\s*(.*?)(?:\n\s*score\s*[:=]|$)", re.I | re.S)
TIE_MARGIN = 0.05
# A JSON reply's token floor per criterion: the schema's rationale may run to 240 characters (~60
# tokens) before the score; a smaller budget cuts the reply before its score (measured: 2 of 8 served
# judgments cut at the default config's 40 tokens, which suit the one-line logprobs rationale).
JSON_TOKENS = 96
# The probe call's item: written for this project; any judge worth the name scores it on any criterion.
PROBE_ANSWER = Answer(
    probe=Probe(id="judge-probe", question="What does the pass statement do?",
                reference="pass is a null operation; nothing happens when it executes."),
    text="pass does nothing when it runs; it is a placeholder where a statement is required.",
    contexts=(Chunk(id="judge-probe-ctx", doc="judge-probe", start=0, end=1,
                    text="pass is a null operation: when it is executed, nothing happens. It is useful as a "
                         "placeholder when a statement is required syntactically."),))
PROBE_CRITERION = LLMCriterion(kind="llm", name="supported", description="The answer is supported by the context.",
                               scale=Scale(anchors={1: "unsupported", 5: "fully supported"}))
AGGREGATES = ("mean", "median", "min")
METHODS = ("auto", "logprobs", "json")
Verdict = Literal["A", "B", "tie"]


def combine(values: list[float], how: str) -> float:
    """A panel's scores as one: their mean, median or minimum (the strictest judge)."""
    if how == "min":
        return min(values)
    if how == "median":
        v = sorted(values)
        mid = len(v) // 2
        return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2
    return sum(values) / len(values)


def choice_probability(logprobs: Any, a: str, b: str) -> float | None:
    """P(a) / (P(a) + P(b)) from the first token's alternatives; None when neither appears."""
    import math

    if not logprobs:
        return None
    mass = {a: 0.0, b: 0.0}
    for alt in logprobs[0].top or ():
        tok = alt.token.strip()
        if tok in mass:
            mass[tok] += math.exp(alt.logprob)
    total = mass[a] + mass[b]
    return mass[a] / total if total > 1e-6 else None


def scale_expectation(logprobs: Any, lo: int, hi: int, min_mass: float = 1e-3) -> float | None:
    """Expected level under the renormalized probabilities of the scale's tokens at the first
    position; None when the scale tokens carry (almost) no probability or none were reported."""
    import math

    if not logprobs:
        return None
    mass: dict[int, float] = {}
    for alt in logprobs[0].top or ():
        tok = alt.token.strip()
        if tok.isdigit() and lo <= int(tok) <= hi:
            mass[int(tok)] = mass.get(int(tok), 0.0) + math.exp(alt.logprob)
    total = sum(mass.values())
    if total < min_mass:
        return None
    return sum(level * p for level, p in mass.items()) / total


def parse_score(text: str, lo: int, hi: int) -> tuple[int | None, str]:
    obj = parse_json_object(text)
    sc = obj.get("score") if obj is not None else None
    if isinstance(sc, (int, float, str)) and not isinstance(sc, bool):
        try:
            v = float(sc)
        except ValueError:
            v = float("nan")
        if v == v and v == int(v):
            return (int(v) if lo <= v <= hi else None), str(obj.get("rationale", "")).strip()[:1000]  # type: ignore[union-attr]
    m = _SCORE.search(text)
    r = _RATIONALE.search(text)
    rationale = (r.group(1) if r else text).strip()[:1000]
    if not m:
        return None, rationale
    v = int(m.group(1))
    return (v if lo <= v <= hi else None), rationale



class Panel:
    """The judge models of a run (``roles``, the first is the primary) and how each is asked
    (``method``: auto = logprobs on the embedded model, JSON from a hosted one)."""

    def __init__(self, roles: list[Role], seed: int = 0, method: str = "auto", aggregate: str = "mean"):
        if not roles:
            raise ValueError("a panel needs at least one judge model")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {sorted(AGGREGATES)}, got {aggregate!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        self.roles, self.method, self.aggregate = list(roles), method, aggregate
        # members' names, unique (they key Score.by_judge): "judge", "judge2", ...
        self.names = [r.name if [x.name for x in roles].count(r.name) == 1 else f"{r.name}#{i + 1}"
                      for i, r in enumerate(roles)]
        self.methods = [method if method != "auto" else ("logprobs" if r.local else "json") for r in roles]
        for r, m in zip(roles, self.methods):
            if m == "logprobs" and not r.local:
                log.warning("judge.method logprobs on hosted model %s: it needs a provider that continues an "
                            "assistant prefill and returns top-20 logprobs (e.g. vLLM); items it cannot score "
                            "are recorded invalid (see the valid-score rate)", r.lm.model)
        self.rng = random.Random(seed)
        self._local = threading.local()

    @property
    def concurrency(self) -> int:
        """Items judged at once: the least of the members' ``concurrency`` (1 with a local member)."""
        return min(getattr(r, "concurrency", 1) for r in self.roles)

    def _token(self) -> str:
        """A fresh fence token: the next of those handed to this thread (``using``), else the next draw."""
        queue = getattr(self._local, "tokens", None)
        return queue.pop(0) if queue else self.draw(1)[0]

    def draw(self, n: int) -> list[str]:
        """The next ``n`` fence tokens of the panel's seeded stream."""
        return [f"DATA-{self.rng.getrandbits(48):012x}" for _ in range(n)]

    @contextmanager
    def using(self, tokens: list[str]) -> Iterator[None]:
        """This thread's calls take their fence tokens from ``tokens`` (drawn beforehand in item order, so
        items judged concurrently get the tokens, hence the prompts and cache keys, of a sequential run)."""
        self._local.tokens = list(tokens)
        try:
            yield
        finally:
            self._local.tokens = None

    @property
    def primary(self) -> Role:
        return self.roles[0]

    def variant(self, roles: list[Role] | None = None, seed: int = 0) -> Panel:
        """The same panel with other roles (e.g. the response cache bypassed) and a new fence seed."""
        return Panel(roles if roles is not None else self.roles, seed=seed, method=self.method,
                     aggregate=self.aggregate)

    def probe(self, c: LLMCriterion | None = None) -> list[tuple[int, str]]:
        """One probe call per member (response cache bypassed) on a fixed item and criterion ``c``:
        does a score parse? A hosted JSON member tries its JSON modes in turn (``hosted.json_modes``) and
        settles on the first whose reply holds a score, so later calls need no fallback. Returns
        (member index, what came back) for each member that gave no score under any mode."""
        c = c or PROBE_CRITERION
        lo, hi = c.scale.min, c.scale.max
        failed: list[tuple[int, str]] = []
        for i, (role, method) in enumerate(zip(self.roles, self.methods)):
            fresh = role.with_lm(role.lm.copy(cache=False))
            if method == "logprobs":  # a panel of its own, so the probe leaves this one's fence tokens alone
                (raw, said), = Panel([fresh], method=method)._score_one(fresh, method, [c], PROBE_ANSWER)
                if raw is None:
                    failed.append((i, f"no {lo}-{hi} digit among its next-token probabilities ({said[:160]!r})"))
                continue
            token = f"DATA-{random.Random(i).getrandbits(48):012x}"
            system, user = (m["content"] for m in criterion_prompt(c, PROBE_ANSWER, token))
            got: list[str] = []
            settled = None
            for mode in json_modes(fresh):
                try:
                    _, text = ask_json(fresh, system, [("user", user)], score_schema(lo, hi),
                                       max_tokens=_json_budget(fresh, 1), mode=mode)
                except Exception as err:
                    got.append(f"{mode}: {type(err).__name__}: {' '.join(str(err).split())[:160]}")
                    if not format_refused(err):  # unreachable, unauthorised, slow: another mode fares no better
                        break
                    continue
                if parse_score(text, lo, hi)[0] is not None:
                    settled = role.json_mode = mode
                    break
                got.append(f"{mode}: {text[:160]!r}")
            if settled is None:
                failed.append((i, "; ".join(got)))
        return failed

    def score_group(self, cs: list[LLMCriterion], answer: Answer, flags: tuple[str, ...] = ()) -> dict[str, Score]:
        """LLM criteria scored together: one structured output per item and member, a rationale
        before each criterion's score. ``flags`` (the item's attack flags) are recorded on each Score."""
        per_member = [self._score_one(role, method, cs, answer) for role, method in zip(self.roles, self.methods)]
        out: dict[str, Score] = {}
        for k, c in enumerate(cs):
            single = [member[k] for member in per_member]
            if len(single) == 1:
                raw, rationale = single[0]
                out[c.name] = (Score(status="invalid", rationale=rationale, flags=flags) if raw is None else
                               Score(value=c.scale.normalize(raw), raw=raw, rationale=rationale, flags=flags))
                continue
            by_judge = {name: raw for name, (raw, _) in zip(self.names, single)}
            rationale = " | ".join(f"[{name}] {r}" for name, (_, r) in zip(self.names, single))[:2000]
            valid = [raw for raw, _ in single if raw is not None]
            if not valid:  # every member failed; one valid member is enough (the others are counted)
                out[c.name] = Score(status="invalid", rationale=rationale, flags=flags, by_judge=by_judge)
                continue
            raw = combine(valid, self.aggregate)
            out[c.name] = Score(value=c.scale.normalize(raw), raw=raw, rationale=rationale, flags=flags,
                                by_judge=by_judge)
        return out

    def _score_one(self, role: Role, method: str, cs: list[LLMCriterion],
                   answer: Answer) -> list[tuple[float | None, str]]:
        """Per criterion, (raw score on its scale or None, rationale) from one judge model."""
        token = self._token()
        system, user = (m["content"] for m in criterion_prompt(cs if len(cs) > 1 else cs[0], answer, token))
        try:
            if method == "logprobs":
                return self._by_logprobs(role, system, user, cs)
            if len(cs) == 1:
                lo, hi = cs[0].scale.min, cs[0].scale.max
                _, text = ask_json(role, system, [("user", user)], score_schema(lo, hi),
                                   max_tokens=_json_budget(role, 1))
                raw, rationale = parse_score(text, lo, hi)
                return [(raw, rationale if raw is not None else f"no score in judge output: {text[:200]!r}")]
            obj, text = ask_json(role, system, [("user", user)], group_schema(cs),
                                 max_tokens=_json_budget(role, len(cs)))
            out: list[tuple[float | None, str]] = []
            for c in cs:
                part = (obj or {}).get(c.name)
                raw, rationale = parse_score(json.dumps(part), c.scale.min, c.scale.max) if isinstance(part, dict) \
                    else (None, "")
                missing = f"no {c.name} score in judge output: {text[:200]!r}"
                out.append((raw, rationale if raw is not None else missing))
            return out
        except Exception as err:
            return [(None, f"judge call failed: {type(err).__name__}: {err}"[:300])] * len(cs)

    @staticmethod
    def _by_logprobs(role: Role, system: str, user: str,
                     cs: list[LLMCriterion]) -> list[tuple[float | None, str]]:
        """Per criterion, a one-line rationale, then E[level] under the scale tokens' next-token
        probabilities (G-Eval). A group is one assistant turn built criterion by criterion, the
        rounded level written in before the next one (each rationale sees the verdicts before it;
        the KV cache is reused)."""
        lm = role.lm
        ask = ("Write one sentence of rationale, then the score." if len(cs) == 1 else
               "For each criterion in turn, write one sentence of rationale, then the score.")
        prompt = (Message.user(f"{user}\n\n{ask}"),)
        done, out = "", []
        for c in cs:
            lo, hi = c.scale.min, c.scale.max
            head = done + (f"Criterion {c.name}:\n" if len(cs) > 1 else "")
            # The rationale is prefilled with its subject so a small model writes a sentence about the
            # answer (left open, SmolLM2 often emits a blank line and nothing else); one line is kept.
            first = lm(Request(model=lm.model, system=system,
                               messages=(*prompt, Message.assistant(f"{head}Rationale: The answer")),
                               config=LMConfig(max_tokens=lm.kwargs.get("max_tokens"), temperature=0.0,
                                               stop=("\n", "Score"))))
            rationale = ("The answer" + (first.text or "").split("<<")[0]).strip()
            prefill = f"{head}Rationale: {rationale}\nScore ({lo}-{hi}): "
            second = lm(Request(model=lm.model, system=system, messages=(*prompt, Message.assistant(prefill)),
                                config=LMConfig(max_tokens=1, temperature=0.0, logprobs=20)))
            raw = scale_expectation(second.logprobs, lo, hi)
            out.append((raw, rationale))
            done = f"{prefill}{round(raw) if raw is not None else '?'}\n\n"
        return out

    def compare(self, c: LLMCriterion, first: Answer, second: Answer) -> tuple[Verdict, float | None, str]:
        """Which of two answers to the same probe better meets ``c``: (verdict, P(first wins), rationale).

        ``first`` is shown as A. On the local model P(A) is read from the next-token probabilities of
        ``A`` and ``B`` after ``Better answer:``; a hosted judge replies in JSON. A panel's P(A) is the
        mean over the members that gave one. Judging both orders (``compare(c, x, y)`` and
        ``compare(c, y, x)``) measures position bias."""
        if not self.roles:
            raise ValueError("no judge model")
        results = [self._compare_one(role, method, c, first, second) for role, method in zip(self.roles, self.methods)]
        ps = [p for p, _ in results if p is not None]
        rationale = " | ".join(r for _, r in results) if len(results) == 1 else \
            " | ".join(f"[{name}] {r}" for name, (_, r) in zip(self.names, results))
        if not ps:
            return "tie", None, rationale[:1000]
        p_a = sum(ps) / len(ps)
        verdict: Verdict = "A" if p_a > 0.5 + TIE_MARGIN else "B" if p_a < 0.5 - TIE_MARGIN else "tie"
        return verdict, p_a, rationale[:1000]

    def _compare_one(self, role: Role, method: str, c: LLMCriterion, first: Answer,
                     second: Answer) -> tuple[float | None, str]:
        token = self._token()
        system, user = (m["content"] for m in pairwise_prompt(c, first, second, token))
        try:
            if method == "logprobs":
                lm = role.lm
                out = lm(Request(model=lm.model, system=system,
                                 messages=(Message.user(user), Message.assistant("Better answer:")),
                                 config=LMConfig(max_tokens=1, temperature=0.0, logprobs=20)))
                p_a = choice_probability(out.logprobs, "A", "B")
                if p_a is None:
                    return None, "no A/B probability in the judge's next token"
                return p_a, f"P(A) = {p_a:.2f}"
            obj, text = ask_json(role, system, [("user", user)], PAIR_SCHEMA, max_tokens=_json_budget(role, 1))
            winner = str((obj or {}).get("winner", "")).strip()
            if winner not in ("A", "B", "tie"):
                return None, f"no verdict in judge output: {text[:200]!r}"
            return {"A": 1.0, "B": 0.0, "tie": 0.5}[winner], str((obj or {}).get("rationale", ""))[:1000]
        except Exception as err:
            return None, f"judge call failed: {type(err).__name__}: {err}"[:300]


def _json_budget(role: Role, criteria: int) -> int:
    """Tokens for a JSON reply on ``criteria`` criteria: the role's ``max_tokens`` each, at least ``JSON_TOKENS``."""
    return max(role.lm.kwargs.get("max_tokens") or 128, JSON_TOKENS) * criteria


def check_judges(panel: Panel, c: LLMCriterion | None, file: str | Path, keys: list[str]) -> None:
    """Stop before any work when a judge model cannot produce a score (``Panel.probe``): an
    ``InputError`` (exit 2) naming the config key, the model and what came back. ``keys[i]`` is
    member ``i``'s key in the config (``models.judge``, ``judge.models.1``)."""
    failed = panel.probe(c)
    if failed:
        i, got = failed[0]
        raise InputError(file, keys[i] if i < len(keys) else "judge",
                         f"judge model {panel.roles[i].lm.model} gave no usable score to a probe call "
                         f"({got}); choose a model that can follow the JSON reply format")


def judge_keys(cfg: Any) -> list[str]:
    """Each judge panel member's key in a run config, for messages."""
    return [f"judge.models.{i}.model" for i in range(len(cfg.judge.models))] if cfg.judge.models \
        else ["models.judge.model"]
