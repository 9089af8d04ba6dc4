"""Hosted and served models: how each is asked for JSON, and the engine for OpenAI-compatible servers.

``lm.ask_json`` walks ``json_modes`` (the provider's JSON-schema mode, llama-cpp-python's
``json_object`` + schema, then prompt-and-parse) and remembers on the role the first its endpoint
accepts; the judge probe (``panel.Panel.probe``) settles it on the first whose reply holds a score.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dspy.lm15 import Config as LMConfig
from dspy.lm15 import Response

if TYPE_CHECKING:
    from .lm import Role


JSON_MODES = ("schema", "object", "prompt")


def json_modes(role: Role) -> tuple[str, ...]:
    """The ways a hosted model may be asked for JSON, most constrained first, or the one it settled on:

    - ``schema``: the OpenAI ``response_format`` ``json_schema`` (OpenAI, vLLM, Ollama, llama.cpp's own
      ``llama-server``; LiteLLM maps it for other providers); skipped for a hosted model (no
      ``api_base``) that LiteLLM knows and reports without response-schema support;
    - ``object``: ``{"type": "json_object", "schema": ...}``, which llama-cpp-python's server
      (``python -m llama_cpp.server``) turns into a grammar; only for a model behind an ``api_base``;
    - ``prompt``: no response format; the JSON is asked for in the prompt and parsed leniently."""
    if role.json_mode is not None:
        return (role.json_mode,)
    served = isinstance(role.lm.engine, ServedEngine) or bool(role.lm.kwargs.get("api_base"))
    modes = list(JSON_MODES)
    if not served:
        modes.remove("object")
        import litellm

        model = role.lm.model
        known = model in litellm.model_cost or model.split("/", 1)[-1] in litellm.model_cost  # else the endpoint says
        if known and not litellm.supports_response_schema(model=model):
            modes.remove("schema")
    return tuple(modes)


def format_refused(err: Exception) -> bool:
    """Did the endpoint refuse the request's shape (worth another JSON mode), rather than being
    unreachable, slow, unauthorised or rate-limited (where another mode would fail the same way)?
    llama-cpp-python's server answers an unknown ``response_format`` with HTTP 500, so any provider
    error other than those counts as a refusal."""
    from dspy.utils.exceptions import (LMAuthError, LMError, LMRateLimitError, LMTimeoutError,
                                       LMTransportError)

    return isinstance(err, LMError) and not isinstance(err, (LMAuthError, LMRateLimitError, LMTimeoutError,
                                                            LMTransportError))


def json_config(mode: str, schema: dict[str, Any], max_tokens: int | None, temperature: Any) -> LMConfig:
    if mode == "schema":
        return LMConfig(max_tokens=max_tokens, temperature=temperature,
                        response_format={"type": "json_schema", "name": "reply", "schema": schema})
    if mode == "object":  # lm15 drops a json_object's schema, so it goes to the wire verbatim
        return LMConfig(max_tokens=max_tokens, temperature=temperature,
                        extensions={"response_format": {"type": "json_object", "schema": schema}})
    return LMConfig(max_tokens=max_tokens, temperature=temperature)


class ServedEngine:
    """A DSPy engine for an OpenAI-compatible server (an ``openai/<model>`` id with ``api_base``: vLLM,
    llama.cpp, llama-cpp-python, LM Studio, Ollama's ``/v1``): lm15's Chat Completions client, the
    token limit sent as ``max_tokens``, the field every such server reads. (lm15's OpenAI dialect sends
    OpenAI's newer ``max_completion_tokens``, which llama-cpp-python's server ignores: a reply then
    runs until the context is full, measured at over 13 minutes for one answer.) The key lives only in
    this client, never in the LM's kwargs; without one, a placeholder is sent rather than any ambient
    ``OPENAI_API_KEY``. DSPy's JSON fallback may ask it for a ``json_object``.

    Faults: DSPy's retry loop (``dspy.LM(num_retries=...)``) retries what it classes as transient (429,
    5xx, timeouts, dropped connections) with exponential backoff or the server's ``Retry-After``. This
    engine adds what that loop cannot know: a reply that waits more than ``timeout`` seconds is a
    timeout (lm15's default is 600 s); a 200 reply whose body is not JSON (a proxy's error page, a cut
    reply) is a server error, so it is retried too; a ``Retry-After`` beyond ``max_retry_wait`` seconds is
    shortened to it (a server asking for an hour would stall the tune)."""

    supported_params = frozenset({"temperature", "max_tokens", "stop", "seed", "response_format"})
    supports_response_schema = False  # selftune asks for schemas itself (json_modes); DSPy gets json_object

    def __init__(self, api_base: str, api_key: str | None, timeout: float = 120.0, max_retry_wait: float = 60.0):
        # lm15's stdlib transport is not re-exported by dspy.lm15; it is the default transport, configured
        from dspy._vendor.lm15.transports import StdlibTransport
        from dspy.lm15 import OpenAIChatCompat, OpenAIChatLM

        self.api_base, self.timeout, self.max_retry_wait = api_base, timeout, max_retry_wait
        transport = StdlibTransport(connect_timeout=min(10.0, timeout), read_timeout=timeout, write_timeout=timeout)
        self._client = OpenAIChatLM(api_key=api_key or "no-key", base_url=api_base, transport=transport,
                                    compat=OpenAIChatCompat(max_tokens_field="max_tokens"))

    def _wire(self, request: Any) -> Any:
        import dataclasses

        return dataclasses.replace(request, model=request.model.split("/", 1)[-1])  # the server's own name

    def complete(self, request: Any) -> Response:
        from dspy import lm15

        try:
            return self._client.complete(self._wire(request))
        except lm15.RateLimitError as err:
            if err.retry_after is not None and err.retry_after > self.max_retry_wait:
                err.retry_after = self.max_retry_wait
            raise
        except lm15.ProviderError as err:
            if type(err) is lm15.ProviderError and "is not JSON" in str(err):  # malformed reply: transient
                raise lm15.ServerError(f"malformed reply: {err.message}", provider=err.provider,
                                       status=err.status) from err
            raise

    def stream(self, request: Any) -> Any:
        return self._client.stream(self._wire(request))

    def close(self) -> None:
        pass
