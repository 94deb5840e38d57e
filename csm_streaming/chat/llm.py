"""The reply's text: a language model's answer, streamed as it is written.

CSM speaks but does not write. Two providers, each through its official SDK:

- Gemini (`google-genai`): GOOGLE_API_KEY (or GEMINI_API_KEY), GEMINI_MODEL (default
  gemini-2.5-flash), GEMINI_BASE_URL for a proxy.
- Any OpenAI-compatible chat endpoint (`openai`): OpenAI, vLLM, Ollama, llama.cpp's server...
  OPENAI_BASE_URL, OPENAI_API_KEY, OPENAI_MODEL (default gpt-4o-mini).

`stream_reply(config, messages)` yields text deltas; `check(config)` asks about the model in a
few seconds, before any work. Every failure (no key, wrong key, endpoint unreachable, timeout,
unknown model, a refused request) is one `LLMError` whose message says what to do and whose
`kind` says which.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

PROVIDERS = ("gemini", "openai")
DEFAULT_MODELS = {"gemini": "gemini-2.5-flash", "openai": "gpt-4o-mini"}
SYSTEM_PROMPT = ("You are a friendly voice in a spoken conversation. Answer in a few short, "
                 "natural sentences, as you would say them aloud: no lists, no markdown, no "
                 "emoji. Spell out anything a voice cannot read.")


class LLMError(RuntimeError):
    """The language model could not give a reply; the message says why and what to do.
    kind: "config" (no key, no provider), "request" (the messages), "key" (refused), "model"
    (unknown), "rate" (limited), "unreachable", "timeout" or "upstream" (any other failure)."""

    def __init__(self, message: str, kind: str = "upstream"):
        super().__init__(message)
        self.kind = kind

    @property
    def http_status(self) -> int:
        """What a server answers for it: the endpoint is down (503), slow (504), or answered
        with an error (502). Never a 500: the fault is upstream."""
        return {"request": 400, "unreachable": 503, "timeout": 504}.get(self.kind, 502)


@dataclass(frozen=True)
class LLMConfig:
    provider: str
    model: str
    api_key: str | None = None
    base_url: str | None = None
    system_prompt: str = SYSTEM_PROMPT
    timeout_s: float = 30.0
    max_tokens: int = 300
    temperature: float = 0.8

    @classmethod
    def from_env(cls, provider: str | None = None, **overrides) -> LLMConfig:
        """The provider and its settings from the environment (see the module doc). provider
        None or "auto" (the --llm flag's default): Gemini when GOOGLE_API_KEY is set, else an
        OpenAI-compatible endpoint when OPENAI_BASE_URL or OPENAI_API_KEY is set."""
        env = os.environ
        gemini_key = env.get("GOOGLE_API_KEY") or env.get("GEMINI_API_KEY")
        if provider in (None, "auto"):
            provider = ("gemini" if gemini_key else "openai"
                        if env.get("OPENAI_BASE_URL") or env.get("OPENAI_API_KEY") else None)
        if provider is None:
            raise LLMError("no language model is configured: set GOOGLE_API_KEY for Gemini, or "
                           "OPENAI_BASE_URL (and OPENAI_API_KEY, OPENAI_MODEL) for an "
                           "OpenAI-compatible endpoint such as OpenAI, vLLM, Ollama or llama.cpp",
                           "config")
        if provider not in PROVIDERS:
            raise LLMError(f"unknown LLM provider {provider!r}: use one of {', '.join(PROVIDERS)}",
                           "config")
        if provider == "gemini":
            config = cls("gemini", env.get("GEMINI_MODEL") or DEFAULT_MODELS["gemini"], gemini_key,
                         env.get("GEMINI_BASE_URL"))
            if not gemini_key:
                raise LLMError("Gemini needs an API key: set GOOGLE_API_KEY (from "
                               "https://aistudio.google.com/apikey)", "config")
        else:
            config = cls("openai", env.get("OPENAI_MODEL") or DEFAULT_MODELS["openai"],
                         env.get("OPENAI_API_KEY"), env.get("OPENAI_BASE_URL"))
            if not config.api_key and not config.base_url:  # OpenAI itself always needs one
                raise LLMError("OpenAI needs an API key: set OPENAI_API_KEY (or OPENAI_BASE_URL "
                               "for a local endpoint such as vLLM, Ollama or llama.cpp)", "config")
        return replace(config, **{k: v for k, v in overrides.items() if v is not None})

    def describe(self) -> str:
        where = f" at {self.base_url}" if self.base_url else ""
        return f"{self.provider} {self.model}{where}"


def check(config: LLMConfig, timeout_s: float = 5.0) -> None:
    """Ask the endpoint about the model, within `timeout_s`, before any work is done: raises
    LLMError saying which is wrong (the key, the endpoint, the model). An endpoint that does not
    list its models (some local servers) passes when it answers at all."""
    quick = replace(config, timeout_s=min(timeout_s, config.timeout_s))
    try:
        if config.provider == "gemini":
            client = _gemini_client(quick)  # held: the SDK closes a client that is collected
            client.models.get(model=config.model)
            return
        client = _openai_client(quick)
        models = [m.id for m in client.models.list()]
    except Exception as e:
        if getattr(e, "status_code", None) == 404 and config.provider == "openai":
            return  # no /models route here: the first reply will tell
        raise _explain(quick, e) from e
    if models and config.model not in models:
        shown = ", ".join(sorted(models)[:8]) + (", ..." if len(models) > 8 else "")
        raise LLMError(f"{config.describe()}: the endpoint has no model {config.model!r} (it "
                       f"has {shown}): set OPENAI_MODEL", "model")


def stream_reply(config: LLMConfig, messages: list[dict]) -> Iterator[str]:
    """The reply to `messages` ([{"role": "user" | "assistant", "content": text}, ...]), as
    text deltas while the model writes it. Raises LLMError."""
    if not messages or messages[-1].get("role") != "user":
        raise LLMError("the conversation must end with the user's message", "request")
    stream = _gemini if config.provider == "gemini" else _openai
    try:
        yield from stream(config, messages)
    except LLMError:
        raise
    except Exception as e:  # the SDKs' own errors, named for the user
        raise _explain(config, e) from e


def _openai(config: LLMConfig, messages: list[dict]) -> Iterator[str]:
    stream = _openai_client(config).chat.completions.create(
        model=config.model, stream=True, max_tokens=config.max_tokens,
        temperature=config.temperature,
        messages=[{"role": "system", "content": config.system_prompt}] + messages)
    with stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content


def _gemini(config: LLMConfig, messages: list[dict]) -> Iterator[str]:
    from google.genai import types

    client = _gemini_client(config)
    contents = [types.Content(role="model" if m["role"] == "assistant" else "user",
                              parts=[types.Part(text=m["content"])]) for m in messages]
    for chunk in client.models.generate_content_stream(
            model=config.model, contents=contents,
            config=types.GenerateContentConfig(system_instruction=config.system_prompt,
                                               max_output_tokens=config.max_tokens,
                                               temperature=config.temperature)):
        if chunk.text:
            yield chunk.text


def _openai_client(config: LLMConfig):
    from openai import OpenAI

    return OpenAI(base_url=config.base_url, api_key=config.api_key or "none",
                  timeout=config.timeout_s, max_retries=1)


def _gemini_client(config: LLMConfig):
    from google import genai
    from google.genai import types

    return genai.Client(api_key=config.api_key, http_options=types.HttpOptions(
        base_url=config.base_url, timeout=int(config.timeout_s * 1000)))


def _explain(config: LLMConfig, e: Exception) -> LLMError:
    """An SDK's exception -> what happened and what to do, in one line. Transport errors are
    told by their class names: the SDKs use different HTTP libraries (google-genai its own
    copy of httpx)."""
    name = config.describe()
    status = getattr(e, "status_code", None) or getattr(e, "code", None)
    text = str(getattr(e, "message", "") or e)[:300]
    key_var = "GOOGLE_API_KEY" if config.provider == "gemini" else "OPENAI_API_KEY"
    kinds = {c.__name__ for err in (e, e.__cause__) if err is not None for c in type(err).__mro__}
    if status in (401, 403) or status == 400 and "API key" in text:  # Gemini: 400 for a bad key
        return LLMError(f"{name} refused the API key ({status}): check {key_var}", "key")
    if status == 404:
        return LLMError(f"{name}: model or endpoint not found (404): check the model name "
                        f"({'GEMINI_MODEL' if config.provider == 'gemini' else 'OPENAI_MODEL'})",
                        "model")
    if status == 429:
        return LLMError(f"{name} is rate-limiting this key (429): wait, or use another key",
                        "rate")
    if any("Timeout" in k for k in kinds):
        return LLMError(f"{name} did not answer within {config.timeout_s:g} s", "timeout")
    if kinds & {"ConnectError", "NetworkError", "APIConnectionError", "ConnectionError"}:
        return LLMError(f"cannot reach {name}: is the endpoint running, and the URL right?",
                        "unreachable")
    if isinstance(status, int):
        return LLMError(f"{name} failed the request ({status}): {text}")
    return LLMError(f"{name} failed: {type(e).__name__}: {text}")
