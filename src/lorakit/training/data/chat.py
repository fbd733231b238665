"""Chat conversations as token ids and labels: every assistant turn trained, the rest masked.

A conversation is rendered with the tokenizer's chat template (or, without one, `PLAIN_TEMPLATE`,
the `role: content` lines that data.chat_prompt prompts with). Which of its tokens are the
assistant's is found one of two ways:

- a template that marks them with `{% generation %} ... {% endgeneration %}` says so itself:
  Transformers' `apply_chat_template(return_assistant_tokens_mask=True)` returns the mask, as it
  does for TRL's `assistant_only_loss`;
- any other template is rendered turn by turn: what an assistant turn adds after the generation
  prompt (its content and the end-of-turn token that closes it) is trained; what every other
  turn adds, and the generation prompt, are masked. That needs each rendered prefix to start the
  next rendering; a template that rewrites earlier turns (one that drops past reasoning, say) is
  refused, naming the line.

Trailing turns after the last assistant turn are masked. Tools and multi-part content are
refused: what a template does with them differs too much between models to mask it right.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import DataError

IGNORE = -100  # the label the loss skips (data.py and tasks.py use this one)
ROLES = ("system", "user", "assistant")

# The rendering used when the tokenizer has no chat template: data.chat_prompt's lines, each
# assistant turn closed by the end-of-text token so that the model learns to stop. (The newline is
# an expression because Transformers renders with trim_blocks, which drops one that follows a tag.)
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ end_of_turn }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
_GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def check_messages(record: dict[str, Any], where: str) -> None:
    """The shape every conversation must have: {role, content} objects with string content."""
    messages = record.get("messages")
    if record.get("tools"):
        raise DataError(
            f"{where}: 'tools' (tool definitions) are not supported; remove the column to train on "
            "the conversation's text"
        )
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if m.get("role") == "tool" or "tool_calls" in m or "function_call" in m:
            raise DataError(
                f"{where}: messages[{i}]: tool calls and tool results are not supported; "
                f"use roles {', '.join(ROLES)} with text content"
            )
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{i}]: role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if isinstance(m.get("content"), list):
            raise DataError(
                f"{where}: messages[{i}]: multi-part content (a list) is not supported; give the text as one string"
            )
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must have string 'content'")


def has_generation_marks(template: Any) -> bool:
    """Whether a chat template marks the assistant's text with {% generation %}."""
    if isinstance(template, dict):  # named templates: apply_chat_template uses "default"
        template = template.get("default")
    return isinstance(template, str) and bool(_GENERATION_MARK.search(template))


def encode_conversation(messages: list[dict[str, str]], tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one checked conversation; labels are IGNORE except on assistant turns."""
    template = getattr(tokenizer, "chat_template", None)
    if template and has_generation_marks(template) and tokenizer.is_fast:
        out = _render(tokenizer, messages, where, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        labels = [t if m else IGNORE for t, m in zip(ids, out["assistant_masks"])]
        if all(t == IGNORE for t in labels) and any(m["role"] == "assistant" for m in messages):
            raise DataError(
                f"{where}: the chat template's {{% generation %}} marks cover none of the assistant's "
                "turns; mark each assistant turn's text, or train on every token (--train-on-inputs)"
            )
        return ids, labels
    plain = {} if template else {"chat_template": PLAIN_TEMPLATE, "end_of_turn": _end_of_turn(tokenizer)}
    text, spans = assistant_spans(messages, tokenizer, where, **plain)
    # Templates write their own begin-of-text token; the plain lines get the tokenizer's.
    return _tokenize(text, spans, tokenizer, special=not template)


def assistant_spans(
    messages: list[dict[str, str]], tokenizer: Any, where: str, **template: Any
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns, found turn by turn."""
    full = _render(tokenizer, messages, where, **template)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(
                f"{where}: messages[0] is the assistant's; without {{% generation %}} marks in the "
                "chat template the turns are found by rendering the conversation before each "
                "assistant turn, so a conversation must start with a system or user turn"
            )
        before = _render(tokenizer, messages[:i], where, add_generation_prompt=True, **template)
        through = _render(tokenizer, messages[: i + 1], where, **template)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                f"{where}: the chat template does not render this conversation turn by turn (the text up to "
                f"messages[{i}] is not how the whole conversation starts), so its assistant turns cannot be "
                "found; mark them with {% generation %} in the template, or train on every token "
                "(--train-on-inputs)"
            )
        # Whitespace after the end-of-turn token separates turns; it is not the answer.
        end = max(len(before), len(through.rstrip()))
        spans.append((len(before), end))
    return full, spans


def _render(tokenizer: Any, messages: list[dict[str, str]], where: str, **kwargs: Any) -> Any:
    kwargs.setdefault("tokenize", False)
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as err:  # noqa: BLE001 - a template's raise_exception, or Jinja's own errors
        raise DataError(f"{where}: the chat template refused this conversation: {err}") from None


def _end_of_turn(tokenizer: Any) -> str:
    token = tokenizer.eos_token or getattr(tokenizer, "sep_token", None)
    return token or ""


def _tokenize(text: str, spans: list[tuple[int, int]], tokenizer: Any, special: bool) -> tuple[list[int], list[int]]:
    """Token ids of `text`, labelled where a token overlaps a span (Transformers' rule for its mask)."""
    if not tokenizer.is_fast:  # no offsets: tokenise piece by piece, each piece trained or not
        return _tokenize_pieces(text, spans, tokenizer)
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    while special and len(ids) > 1 and tuple(offsets[-1]) == (0, 0):
        ids.pop()  # a token added after the text (BERT's [SEP]) would end the sequence before the answer
        offsets.pop()
    labels = []
    for token, (start, end) in zip(ids, offsets):
        inside = end > start and any(end > s and start < e for s, e in spans)
        labels.append(token if inside else IGNORE)
    return ids, labels


def _tokenize_pieces(text: str, spans: list[tuple[int, int]], tokenizer: Any) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    cuts = [0] + [p for s in spans for p in s] + [len(text)]
    for k in range(len(cuts) - 1):
        piece = text[cuts[k] : cuts[k + 1]]
        if not piece:
            continue
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        labels += piece_ids if k % 2 else [IGNORE] * len(piece_ids)
    return ids, labels
