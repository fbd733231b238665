"""What the engine tells a request about one of its rows, from the model thread: new text, the
end (and why), or a failure. The app turns them into an answer or server-sent events."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sampling import TokenLogprob


@dataclass(frozen=True)
class Text:
    """New text of the row, with the log-probability entries of its tokens not sent before."""

    delta: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class Done:
    """The row finished: "stop" (end of text, a stop token or string) or "length"; `stop` is the
    stop string or token id that ended it (None for end of text or length)."""

    finish_reason: str
    stop: str | int | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class Failed:
    """The row cannot go on: a RowError (its status and message) or the exception it raised."""

    error: Exception


Event = Text | Done | Failed
