"""The request bodies `lorakit serve` accepts and the bodies it answers with: vLLM's (v0.33)
OpenAI-compatible shapes, so a client can move between the two servers unchanged.

The sampling fields that change the answer are vLLM's (sampling.py does the math). vLLM's fields
that would change the answer in ways lorakit does not implement (`REFUSED`: echo, beam search,
best_of, structured output, tools, ...) are refused by name with 422 unless they hold their
neutral value. Any other field is accepted and ignored with a warning in the log, as vLLM does
(its request models allow extra fields and log the names they ignore).
Every number must be finite: Python's JSON parser takes `NaN`, `Infinity` and `1e400`, and one
such value would poison the batch it runs in, so it is a 422 naming the field instead.
Needs pydantic (a FastAPI dependency: the `serve` extra).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from .sampling import MAX_LOGPROBS, Sampling, TokenLogprob

log = logging.getLogger("lorakit.serve")

# vLLM's request fields that change the answer and that lorakit does not implement: each with
# the test for its neutral value (the default, or a value that changes nothing).
REFUSED: dict[str, Callable[[Any, Any], bool]] = {
    "echo": lambda v, body: not v,
    "suffix": lambda v, body: not v,
    "best_of": lambda v, body: v is None or v == getattr(body, "n", 1),
    "use_beam_search": lambda v, body: not v,
    "prompt_logprobs": lambda v, body: v is None,
    "logprob_token_ids": lambda v, body: v is None,
    "allowed_token_ids": lambda v, body: v is None,
    "bad_words": lambda v, body: not v,
    "include_stop_str_in_output": lambda v, body: not v,
    "skip_special_tokens": lambda v, body: v is None or v is True,
    "spaces_between_special_tokens": lambda v, body: v is None or v is True,
    "truncate_prompt_tokens": lambda v, body: v is None,
    "prompt_embeds": lambda v, body: v is None,
    "return_token_ids": lambda v, body: not v,
    "return_tokens_as_token_ids": lambda v, body: not v,
    "watermarking": lambda v, body: not v,
    "repetition_detection": lambda v, body: v is None,
    "structured_outputs": lambda v, body: v is None,
    "guided_json": lambda v, body: v is None,
    "guided_regex": lambda v, body: v is None,
    "guided_choice": lambda v, body: v is None,
    "guided_grammar": lambda v, body: v is None,
    "guided_decoding_backend": lambda v, body: v is None,
    "guided_whitespace_pattern": lambda v, body: v is None,
    "response_format": lambda v, body: v is None or v == {"type": "text"},
    "tools": lambda v, body: v is None,
    "tool_choice": lambda v, body: v in (None, "none"),
    "chat_template": lambda v, body: v is None,
    "chat_template_kwargs": lambda v, body: not v,
    "documents": lambda v, body: v is None,
    "reasoning_effort": lambda v, body: v is None,
    "add_generation_prompt": lambda v, body: v is None or v is True,
    "continue_final_message": lambda v, body: not v,
    # The completions endpoint adds the tokenizer's special tokens, the chat endpoint does not.
    "add_special_tokens": lambda v, body: v is None or v is (not hasattr(body, "messages")),
}
# vLLM's fields that change nothing here (bookkeeping, or features lorakit's models lack): no warning.
_HARMLESS = frozenset(
    {
        "user",
        "request_id",
        "session_id",
        "priority",
        "cache_salt",
        "kv_transfer_params",
        "ec_transfer_params",
        "vllm_xargs",
        "stream_interval",
        "length_penalty",
        "include_reasoning",
        "parallel_tool_calls",
        "thinking_token_budget",
        "mm_processor_kwargs",
        "media_io_kwargs",
        "return_mm_kwargs",
        "return_token_offsets",
        "return_prompt_text",
        "truncation_side",
        "routed_experts_prompt_start",
        "service_tier",
        "store",
        "metadata",
    }
)

# Every body takes finite numbers only (pydantic applies it to every float field, nested ones too).
_FINITE = ConfigDict(extra="allow", allow_inf_nan=False)
# Sampling divides float32 logits by the temperature: below float32's smallest normal number the
# quotient is inf or nan whatever the logits, so such a temperature could only fail.
MIN_TEMPERATURE = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny


def _not_empty(value: Any) -> Any:
    if isinstance(value, list) and not value:
        raise ValueError("give at least one")
    return value


def _temperature(value: float) -> float:
    if 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:.4g}, got {value!r}")
    return value


# One text or token-id list, or several: vLLM's `prompt` / `input`.
Texts = Annotated[str | list[str] | list[int] | list[list[int]], AfterValidator(_not_empty)]


def as_list(value: Any) -> list[str | list[int]]:
    """The texts (or token-id lists) of a `Texts` field, one per row."""
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        return [value]
    return list(value)


class _Body(BaseModel):
    model_config = _FINITE

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        extra = self.model_extra or {}
        for name, neutral in REFUSED.items():
            if name in extra and not neutral(extra[name], self):
                raise ValueError(
                    f"{name!r} is not supported by lorakit serve (it would change the answer); leave it out"
                )
        ignored = sorted(set(extra) - set(REFUSED) - _HARMLESS)
        if ignored:
            log.warning("fields ignored (lorakit serve does not know them): %s", ", ".join(ignored))
        return self


class _Generation(_Body):
    model: str | None = None
    adapters: dict[str, float] | None = None  # lorakit's extension: a weighted mix of adapters
    temperature: Annotated[float, Field(ge=0.0), AfterValidator(_temperature)] | None = None
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=64)
    # vLLM's sampling fields (sampling.py); None: vLLM's neutral value.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be given with stream=true")
        return self

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_as_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.strip().lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f'logit_bias keys are token ids ("0", "1", ...), not {key!r}')
            if not math.isfinite(bias):
                raise ValueError(f"logit_bias[{key!r}] must be a finite number")
        return value

    def _check_min_tokens(self, limit: int | None, limit_name: str) -> None:
        if limit is not None and self.min_tokens > limit:
            raise ValueError(f"min_tokens ({self.min_tokens}) may not exceed {limit_name} ({limit})")

    def sampling(self, logprobs: int | None) -> Sampling:
        """The request's sampling fields, vLLM's defaults where not given."""
        return Sampling(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            # vLLM clips each bias to [-100, 100], as OpenAI documents the range.
            logit_bias=tuple((int(k), min(100.0, max(-100.0, b))) for k, b in (self.logit_bias or {}).items()),
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            stop_token_ids=tuple(dict.fromkeys(self.stop_token_ids or ())),
            logprobs=logprobs,
        )

    def stops(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stop if s)


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class CompletionRequest(_Generation):
    prompt: Texts
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # alternatives per token; 0: the chosen only

    @model_validator(mode="after")
    def _min_tokens_fit(self):
        self._check_min_tokens(self.max_tokens, "max_tokens")
        return self

    def settings(self) -> Sampling:
        return self.sampling(self.logprobs)


class ChatMessage(BaseModel):
    model_config = _FINITE
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: only text parts can be served here
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"message content part of type {part.get('type')!r}: only text is supported")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _chat_checks(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        limit_name = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
        self._check_min_tokens(self.limit(), limit_name)
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def settings(self) -> Sampling:
        return self.sampling((self.top_logprobs or 0) if self.logprobs else None)


class ClassifyRequest(_Body):
    model: str | None = None
    adapters: dict[str, float] | None = None
    input: Texts


class LoadRequest(_Body):
    lora_name: str
    lora_path: str


class UnloadRequest(_Body):
    lora_name: str


# ---- answers -------------------------------------------------------------------------------


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().int & (2**64 - 1):016x}"


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """vLLM's (and OpenAI's) error envelope; `type` is the name OpenAI's client gives the status."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "APIError"), "param": param, "code": status}}


ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


def model_card(model_id: str, root: str, parent: str | None, max_model_len: int | None) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "lorakit",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
    }


def classify_answer(model: str, results: list[tuple[list[float], str | None]], prompt_tokens: int) -> dict[str, Any]:
    data = [
        {"index": i, "label": label, "probs": probs, "num_classes": len(probs)}
        for i, (probs, label) in enumerate(results)
    ]
    return {
        "id": request_id("classify"),
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": usage(prompt_tokens, 0),
    }


def completion_choice(
    kind: Literal["text", "chat"],
    index: int,
    text: str,
    finish: str,
    stop: str | int | None,
    logprobs: dict | None = None,
) -> dict:
    if kind == "text":
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop}
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": logprobs,
        "finish_reason": finish,
        "stop_reason": stop,
    }


def _logprob(value: float) -> float:
    return max(value, -9999.0)  # OpenAI's (and vLLM's) stand-in for -inf, which JSON cannot carry


def completion_logprobs(
    entries: list[TokenLogprob],
    decode: Callable[[int], str],
    offset: int = 0,
) -> tuple[dict[str, Any], int]:
    """The completions API's `logprobs` for some tokens, and the text offset after them: per token its
    text, log-probability, offset, and {text: log-probability} of the most likely tokens and the chosen
    one (so up to n + 1 entries, as OpenAI documents)."""
    tokens, values, offsets, tops = [], [], [], []
    for entry in entries:
        text = decode(entry.token)
        tokens.append(text)
        values.append(_logprob(entry.logprob))
        offsets.append(offset)
        offset += len(text)
        top = {text: _logprob(entry.logprob)}
        for token, value in entry.top:
            top.setdefault(decode(token), _logprob(value))
        tops.append(top)
    return {"text_offset": offsets, "token_logprobs": values, "tokens": tokens, "top_logprobs": tops}, offset


def chat_logprobs(entries: list[TokenLogprob], decode: Callable[[int], str]) -> dict[str, Any]:
    """The chat API's `logprobs`: per token its text, log-probability, UTF-8 bytes and the
    `top_logprobs` most likely tokens (OpenAI's definition: the top n, whichever was chosen)."""

    def item(token: int, value: float) -> dict[str, Any]:
        text = decode(token)
        text_bytes = list(text.encode("utf-8", errors="replace"))
        return {"token": text, "logprob": _logprob(value), "bytes": text_bytes}

    return {"content": [dict(item(e.token, e.logprob), top_logprobs=[item(t, v) for t, v in e.top]) for e in entries]}


def completion_answer(
    kind: Literal["text", "chat"],
    rid: str,
    created: int,
    model: str,
    choices: list[dict],
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion" if kind == "text" else "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(
    kind: Literal["text", "chat"],
    rid: str,
    created: int,
    model: str,
    index: int,
    text: str | None,
    finish: str | None = None,
    stop: str | int | None = None,
    first: bool = False,
    logprobs: dict | None = None,
) -> dict[str, Any]:
    """One server-sent event's body: one choice's new text (and its tokens' logprobs), or its end."""
    if kind == "text":
        choice = {
            "index": index,
            "text": text or "",
            "logprobs": logprobs,
            "finish_reason": finish,
            "stop_reason": stop,
        }
        return _chunk_body(kind, rid, created, model, [choice])
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    if finish is not None:
        choice["stop_reason"] = stop
    return _chunk_body(kind, rid, created, model, [choice])


def usage_chunk(
    kind: Literal["text", "chat"], rid: str, created: int, model: str, prompt: int, completion: int
) -> dict:
    """The last event's body with `stream_options.include_usage`: no choice, the request's token counts."""
    return {**_chunk_body(kind, rid, created, model, []), "usage": usage(prompt, completion)}


def _chunk_body(kind: Literal["text", "chat"], rid: str, created: int, model: str, choices: list) -> dict[str, Any]:
    obj = "text_completion" if kind == "text" else "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}


_Generation.model_rebuild()
CompletionRequest.model_rebuild()
ChatRequest.model_rebuild()
