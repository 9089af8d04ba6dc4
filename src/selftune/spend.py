"""What a tune spends, per role and in all: calls, tokens, US dollars; the caps on them; prices.

Prices come from LiteLLM's *offline* cost map (``litellm.model_cost``, read with
``LITELLM_LOCAL_MODEL_COST_MAP=True`` so nothing is downloaded); the local model costs 0 but its
calls count. Calls are counted for every call (response-cache hits included, so a rerun stops where
the first run did); tokens and dollars only for calls a provider answered (a cache hit is free). The
ledger (``lm.CallLedger``) checks the caps before every call and after every reply; the loop ends the
tune after the current candidate once one is reached (``Caps.reached``), and starts no candidate that its
forecast says would leave too little for the held-out test (``Forecast``, ``Caps.forecast``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any


class TuneStopped(RuntimeError):
    """The tune cannot go on (e.g. a role fails on too many items); ``str(err)`` is one line saying why.
    Every finished round is already in MLflow; the parent run is marked failed with the reason."""


@lru_cache(maxsize=256)
def prices(model: str) -> tuple[float, float] | None:
    """(USD per input token, per output token) for a LiteLLM id; (0, 0) for ``local``; None when the
    offline cost map does not know the model (the id as given, or without its provider prefix)."""
    if model == "local" or model.startswith("local/"):
        return 0.0, 0.0
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the map from the network
    import litellm

    for key in (model, model.split("/", 1)[-1]):
        info = litellm.model_cost.get(key)
        if isinstance(info, dict) and info.get("input_cost_per_token") is not None:
            return float(info["input_cost_per_token"]), float(info.get("output_cost_per_token") or 0.0)
    return None


def usage_tokens(usage: dict[str, Any] | None) -> tuple[int, int]:
    """(prompt, completion) tokens from a DSPy usage dict (OpenAI or lm15 field names)."""
    u = usage or {}
    prompt = u.get("prompt_tokens", u.get("input_tokens")) or 0
    completion = u.get("completion_tokens", u.get("output_tokens")) or 0
    return int(prompt), int(completion)


@dataclass
class Spend:
    calls: int = 0
    tokens: int = 0
    usd: float = 0.0


ByRole = dict[str, Spend]


def total(by_role: ByRole) -> Spend:
    out = Spend()
    for s in by_role.values():
        out.calls, out.tokens, out.usd = out.calls + s.calls, out.tokens + s.tokens, out.usd + s.usd
    return out


def combine(a: ByRole, b: ByRole, k: float = 1.0) -> ByRole:
    """Per role, ``a + k * b`` (``k = -1``: what was spent between two snapshots)."""
    return {r: Spend(calls=a.get(r, Spend()).calls + k * b.get(r, Spend()).calls,  # type: ignore[arg-type]
                     tokens=a.get(r, Spend()).tokens + k * b.get(r, Spend()).tokens,  # type: ignore[arg-type]
                     usd=a.get(r, Spend()).usd + k * b.get(r, Spend()).usd) for r in {*a, *b}}


def per_item(before: ByRole, after: ByRole, items: int) -> ByRole:
    """What was spent between two snapshots, per item of ``items``."""
    return combine({}, combine(after, before, -1), 1 / max(items, 1))


@dataclass
class Forecast:
    """What the next candidate and the held-out test will cost, from what this tune has spent: a candidate,
    the mean of the candidates so far (before the first: the baseline's cost per item times the validation
    items); the test, the baseline's cost per item times the test items, twice (the baseline and the best are
    both scored). Each a spend by role."""

    per_item: ByRole = field(default_factory=dict)
    candidates: list[ByRole] = field(default_factory=list)

    def candidate(self, n_val: int) -> ByRole:
        if not self.candidates:
            return combine({}, self.per_item, n_val)
        mean: ByRole = {}
        for c in self.candidates:
            mean = combine(mean, c, 1 / len(self.candidates))
        return mean

    def test(self, n_test: int) -> ByRole:
        return combine({}, self.per_item, 2 * n_test)


@dataclass
class Caps:
    """The tune's caps (``optimizer.budget``) and each role's (``models.<role>.budget``); None: no cap."""

    tune: dict[str, float | None] = field(default_factory=dict)
    roles: dict[str, dict[str, float | None]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # role -> its config key, for messages

    @classmethod
    def of(cls, cfg: Any) -> Caps:
        from .config import ROLES

        budget = cfg.optimizer.budget
        roles = {r: getattr(cfg.models, r).budget for r in ROLES}
        keys = {r: f"models.{r}" for r in ROLES}
        for i, spec in enumerate(cfg.judge.models or []):
            name = "judge" if i == 0 else f"judge{i + 1}"
            roles[name], keys[name] = spec.budget, f"judge.models.{i}"
        return cls(tune={"calls": budget.calls, "tokens": budget.tokens, "usd": budget.usd},
                   roles={r: {"calls": b.calls, "tokens": b.tokens, "usd": b.usd} for r, b in roles.items()},
                   keys=keys)

    def reached(self, total: Spend, by_role: dict[str, Spend]) -> str | None:
        """A one-line reason naming the first cap reached, or None."""
        for what, cap in self.tune.items():
            if cap is not None and getattr(total, what) >= cap:
                return f"tune budget reached: {_fmt(what, getattr(total, what))} >= {_fmt(what, cap)} " \
                       f"(optimizer.budget.{what})"
        for role, caps in self.roles.items():
            spent = by_role.get(role, Spend())
            for what, cap in caps.items():
                if cap is not None and getattr(spent, what) >= cap:
                    key = self.keys.get(role, f"models.{role}")
                    return f"{role} budget reached: {_fmt(what, getattr(spent, what))} >= {_fmt(what, cap)} " \
                           f"({key}.budget.{what})"
        return None


    def forecast(self, spent: ByRole, candidate: ByRole, test: ByRole) -> str | None:
        """A one-line reason naming the first cap that another ``candidate`` and then the held-out ``test``
        would pass on top of ``spent`` (the spend by role), or None when both fit."""
        scopes = [("tune", "optimizer.budget", self.tune, total(spent), total(candidate), total(test))]
        scopes += [(role, f"{self.keys.get(role, f'models.{role}')}.budget", caps, spent.get(role, Spend()),
                    candidate.get(role, Spend()), test.get(role, Spend())) for role, caps in self.roles.items()]
        for who, key, caps, now, cand, tst in scopes:
            for what, cap in caps.items():
                spent_now, more, last = getattr(now, what), getattr(cand, what), getattr(tst, what)
                if cap is not None and spent_now + more + last > cap:
                    return (f"{who} budget forecast: {_fmt(what, spent_now)} spent + ~{_fmt(what, more)} for another "
                            f"candidate + ~{_fmt(what, last)} for the held-out test > {_fmt(what, cap)} "
                            f"({key}.{what})")
        return None


def _fmt(what: str, value: float) -> str:
    return f"${value:.6g}" if what == "usd" else f"{round(value)} {what}"
