"""The request bodies `lorakit serve` accepts and the bodies it answers with: vLLM's (v0.33)
OpenAI-compatible shapes, so a client can move between the two servers unchanged.

Unknown fields are accepted and ignored, as vLLM does; fields that would change the answer in
ways lorakit does not implement (logprobs, echo, beam search, best_of) are refused by name.
Every number must be finite: Python's JSON parser takes `NaN`, `Infinity` and `1e400`, and one
such value would poison the batch it runs in, so it is a 422 naming the field instead.
Needs pydantic (a FastAPI dependency: the `serve` extra).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

# Every body takes finite numbers only (pydantic applies it to every float field, nested ones too).
_FINITE = ConfigDict(extra="allow", allow_inf_nan=False)
# Sampling divides float32 logits by the temperature: below float32's smallest normal number the
# quotient is inf or nan whatever the logits, so such a temperature could only fail.
MIN_TEMPERATURE = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny

_UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "use_beam_search", "suffix", "prompt_logprobs")


def _not_empty(value: Any) -> Any:
    if isinstance(value, list) and not value:
        raise ValueError("give at least one")
    return value


def _temperature(value: float) -> float:
    if 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:.4g}, got {value!r}")
    return value


# One text or token-id list, or several: vLLM's `prompt` / `input`.
Texts = Annotated[Union[str, list[str], list[int], list[list[int]]], AfterValidator(_not_empty)]


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
        for name in _UNSUPPORTED:
            if extra.get(name) not in (None, False, 0):
                raise ValueError(f"{name!r} is not supported by lorakit serve")
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

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be given with stream=true")
        return self

    def stops(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stop if s)


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class CompletionRequest(_Generation):
    prompt: Texts
    max_tokens: int | None = Field(16, ge=1)


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

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


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


ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
               404: "NotFoundError", 405: "MethodNotAllowed", 413: "RequestTooLargeError",
               422: "UnprocessableEntityError", 429: "RateLimitError", 500: "InternalServerError",
               503: "ServiceUnavailableError"}


def model_card(model_id: str, root: str, parent: str | None, max_model_len: int | None) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "lorakit", "root": root,
            "parent": parent, "max_model_len": max_model_len}


def classify_answer(model: str, results: list[tuple[list[float], str | None]], prompt_tokens: int) -> dict[str, Any]:
    data = [{"index": i, "label": label, "probs": probs, "num_classes": len(probs)}
            for i, (probs, label) in enumerate(results)]
    return {"id": request_id("classify"), "object": "list", "created": int(time.time()), "model": model,
            "data": data, "usage": usage(prompt_tokens, 0)}


def completion_choice(kind: Literal["text", "chat"], index: int, text: str, finish: str, stop: str | None) -> dict:
    if kind == "text":
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": stop}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish, "stop_reason": stop}


def completion_answer(kind: Literal["text", "chat"], rid: str, created: int, model: str, choices: list[dict],
                      prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion" if kind == "text" else "chat.completion", "created": created,
            "model": model, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chunk(kind: Literal["text", "chat"], rid: str, created: int, model: str, index: int, text: str | None,
          finish: str | None = None, stop: str | None = None, first: bool = False) -> dict[str, Any]:
    """One server-sent event's body: one choice's new text, or its end."""
    if kind == "text":
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish, "stop_reason": stop}
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    if finish is not None:
        choice["stop_reason"] = stop
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


_Generation.model_rebuild()
CompletionRequest.model_rebuild()
ChatRequest.model_rebuild()
