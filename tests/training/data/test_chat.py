"""training/data/chat.py: every assistant turn trained, with and without {% generation %} marks, the rest masked;
what is refused; --train-on-inputs; the same tokens trained as TRL's SFTTrainer(assistant_only_loss)."""

from __future__ import annotations

import copy

import pytest
from helpers import make_tokenizer, tiny_model, write_jsonl

from lorakit.training.data import chat
from lorakit.training.data import examples as D

# Word-level tokenizer: every piece of a template is its own word. The role names are unknown words.
_TURN = "{{ m['role'] }} : "
MARKED = (
    "{% for m in messages %}" + _TURN + "{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }} [EOS]{% endgeneration %}{% else %}{{ m['content'] }} [EOS]{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
UNMARKED = (
    "{% for m in messages %}" + _TURN + "{{ m['content'] }} [EOS] {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
# Drops the content of every assistant turn but the last (as templates that drop past reasoning do).
NOT_PREFIX = (
    "{% for m in messages %}" + _TURN + "{% if m['role'] != 'assistant' or loop.last %}"
    "{{ m['content'] }}{% endif %} [EOS] {% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


SYSTEM = turn("system", "answer please")
THREE = [
    SYSTEM,
    turn("user", "count from 3 :"),
    turn("assistant", "4 5 6"),
    turn("user", "next"),
    turn("assistant", "7 8 9"),
    turn("user", "next please"),
    turn("assistant", "10 11 12"),
]
TRAILING_USER = [turn("user", "count from 1 :"), turn("assistant", "2 3"), turn("user", "next")]
CONVERSATIONS = [
    THREE,
    TRAILING_USER,
    [turn("user", "list good"), turn("assistant", "great fine")],
    [SYSTEM, turn("user", "count to 5"), turn("assistant", "1 2 3 4 5")],
]


# ChatML on a byte-level BPE tokenizer (spaces and newlines inside tokens, as in real models).
CHATML_MARKED = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}"
    "<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_CONVERSATIONS = [
    [
        turn("system", "You are terse."),
        turn("user", "What is 2 + 2?"),
        turn("assistant", "It is 4."),
        turn("user", "And doubled?"),
        turn("assistant", " Eight, of course!\n"),
        turn("user", "Hello"),
    ],
    [turn("user", "Hello there, how are you?"), turn("assistant", "Terse.")],
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def chatml():
    """A byte-level BPE tokenizer trained on a few sentences, with ChatML's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    text = "You are terse. What is 2 + 2? It is 4. And doubled? Eight, of course!\nHello there, how are you?"
    core.train_from_iterator(
        [text] * 20,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def trained_runs(labels: list[int]) -> list[list[int]]:
    """The runs of consecutive trained label ids."""
    runs, current = [], []
    for t in labels + [D.IGNORE]:
        if t != D.IGNORE:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs


def answers(tokenizer, messages) -> list[list[int]]:
    """What each assistant turn should train: its content and the end-of-turn token."""
    eos = tokenizer.eos_token_id
    return [
        tokenizer(m["content"], add_special_tokens=False)["input_ids"] + [eos]
        for m in messages
        if m["role"] == "assistant"
    ]


@pytest.mark.parametrize("template", [MARKED, UNMARKED], ids=["generation-marks", "turn-by-turn"])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["three-turns", "trailing-user", "one-turn", "system"])
def test_every_assistant_turn_is_trained_and_nothing_else(base, template, messages):
    tok = with_template(base, template)
    ids, labels = chat.encode_conversation(messages, tok, "c.jsonl:1")
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert all(t in (D.IGNORE, i) for t, i in zip(labels, ids, strict=True))
    # One run per assistant turn, each its content and the [EOS] that closes it: the system and
    # user turns (and their [EOS]), the role words and the trailing user turn are masked.
    assert trained_runs(labels) == answers(tok, messages)
    if messages[-1]["role"] != "assistant":
        tail = len(tok(f"user : {messages[-1]['content']} [EOS]", add_special_tokens=False)["input_ids"])
        assert labels[-tail:] == [D.IGNORE] * tail


def test_three_assistant_turns_all_trained_with_their_end_of_turn(base):
    tok = with_template(base, UNMARKED)
    ids, labels = chat.encode_conversation(THREE, tok, "c.jsonl:1")
    eos = tok.eos_token_id
    closing = [k for k, i in enumerate(ids) if i == eos]
    assert len(closing) == len(THREE)  # one [EOS] per turn
    trained_eos = [k for k in closing if labels[k] == eos]
    assert len(trained_eos) == 3  # the three assistant turns' [EOS], not the system's or users'
    roles = [m["role"] for m in THREE]
    assert [roles[closing.index(k)] for k in trained_eos] == ["assistant"] * 3


def test_without_a_template_the_plain_lines_train_every_answer_and_its_end(base):
    ids, labels = chat.encode_conversation(THREE, base, "c.jsonl:1")
    assert trained_runs(labels) == answers(base, THREE)
    # What precedes the first answer is the prompt `lorakit generate` / serve would give.
    first = labels.index(next(t for t in labels if t != D.IGNORE))
    assert ids[:first] == base(D.chat_prompt(THREE[:2]))["input_ids"]


def test_added_tokens_around_the_plain_lines(tmp_path):
    """A tokenizer that wraps every text in [BOS] ... [EOS]: the [BOS] stays (masked), the
    closing one added after the text is dropped (the conversation ends with its own)."""
    from tokenizers import processors

    tok = make_tokenizer(tmp_path)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)]
    )
    messages = [turn("user", "count from 3 :"), turn("assistant", "4 5")]
    ids, labels = chat.encode_conversation(messages, tok, "c.jsonl:1")
    assert ids[0] == tok.bos_token_id and labels[0] == D.IGNORE
    assert trained_runs(labels) == answers(tok, messages)
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1


def test_tokenizers_without_offsets_cut_the_same_tokens(base):
    """A tokenizer with no offset mapping (a Python one) is tokenised piece by piece."""

    class NoOffsets:
        is_fast = False

        def __init__(self, tok):
            self.tok = tok

        def __call__(self, text, **kw):
            return self.tok(text, **kw)

    tok = with_template(base, UNMARKED)
    text, spans = chat.assistant_spans(THREE, tok, "c.jsonl:1")
    assert chat._tokenize(text, spans, NoOffsets(tok), special=False) == chat._tokenize(text, spans, tok, False)


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_the_line(base, tmp_path):
    tok = with_template(base, NOT_PREFIX)
    ds = D.read_dataset(write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[2]}, {"messages": THREE}]))
    D.validate(ds, "causal-lm")
    with pytest.raises(
        D.DataError,
        match=r"c\.jsonl:2: the chat template does not render this conversation "
        r"turn by turn .*messages\[2\].*\{% generation %\}",
    ):
        D.encode(ds, "causal-lm", tok, 64)
    D.encode(ds.subset([0]), "causal-lm", tok, 64)  # a single turn is rendered the same either way


def test_a_template_that_raises_is_a_data_error(base, tmp_path):
    tok = with_template(base, "{{ raise_exception('roles must alternate') }}")
    ds = D.read_dataset(write_jsonl(tmp_path / "c.jsonl", [{"messages": THREE}]))
    with pytest.raises(D.DataError, match=r"c\.jsonl:1: the chat template refused this conversation: roles must"):
        D.encode(ds, "causal-lm", tok, 64)


def test_generation_marks_that_cover_no_assistant_turn_are_refused(base):
    template = MARKED.replace("m['role'] == 'assistant'", "m['role'] == 'nobody'")
    with pytest.raises(D.DataError, match=r"c\.jsonl:2: the chat template's \{% generation %\} marks cover none"):
        chat.encode_conversation(THREE, with_template(base, template), "c.jsonl:2")


def test_an_assistant_first_conversation(base):
    messages = [turn("assistant", "good"), turn("user", "next"), turn("assistant", "fine")]
    _, labels = chat.encode_conversation(messages, with_template(base, MARKED), "c.jsonl:3")
    assert trained_runs(labels) == answers(base, messages)
    with pytest.raises(D.DataError, match=r"c\.jsonl:3: messages\[0\] is the assistant's"):
        chat.encode_conversation(messages, with_template(base, UNMARKED), "c.jsonl:3")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": THREE, "tools": [{"type": "function", "function": {"name": "f"}}]}, r"'tools' .* not supported"),
        (
            {
                "messages": [
                    turn("user", "hi"),
                    {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]},
                ]
            },
            r"messages\[1\]: tool calls and tool results are not supported",
        ),
        ({"messages": [turn("user", "hi"), turn("tool", "42")]}, r"messages\[1\]: tool calls and tool results"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
            r"messages\[0\]: multi-part content \(a list\) is not supported",
        ),
    ],
    ids=["tools", "tool_calls", "tool-role", "multi-part"],
)
def test_tools_and_multi_part_content_are_refused_naming_the_line(tmp_path, record, message):
    ds = D.read_dataset(write_jsonl(tmp_path / "c.jsonl", [{"messages": THREE}, record]))
    with pytest.raises(D.DataError, match=r"c\.jsonl:2: " + message):
        D.validate(ds, "causal-lm")


def test_train_on_inputs_trains_every_token(base, tmp_path):
    rows = [{"messages": THREE}, {"messages": [turn("user", "count from 3 :")]}]
    ds = D.read_dataset(write_jsonl(tmp_path / "c.jsonl", rows))
    tok = with_template(base, UNMARKED)
    with pytest.raises(D.DataError, match=r"c\.jsonl:2: nothing to train on \(no assistant turn\)"):
        D.encode(ds, "causal-lm", tok, 64)
    enc = D.encode(ds, "causal-lm", tok, 64, train_on_inputs=True)
    assert enc.labels == enc.input_ids
    pairs = D.read_dataset(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "count from 3 :", "completion": "4"}]))
    enc = D.encode(pairs, "causal-lm", tok, 64, train_on_inputs=True)
    assert enc.labels == enc.input_ids and D.IGNORE not in enc.labels[0]
    classify = D.read_dataset(write_jsonl(tmp_path / "k.jsonl", [{"text": "good", "label": "pos"}]))
    with pytest.raises(D.DataError, match="--train-on-inputs is for causal-lm data"):
        D.encode(classify, "classify", tok, 64, ["neg", "pos"], train_on_inputs=True)


def test_max_length_cuts_and_says_which(base, tmp_path):
    tok = with_template(base, UNMARKED)
    ds = D.read_dataset(write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in CONVERSATIONS]))
    full = D.encode(ds, "causal-lm", tok, 64)
    enc = D.encode(ds, "causal-lm", tok, 16)
    assert enc.cut == [i for i, ids in enumerate(full.input_ids) if len(ids) > 16] != []
    assert all(ids == f[:16] for ids, f in zip(enc.input_ids, full.input_ids))
    # The system turn, the question and "assistant :" take 14 tokens: with 6 no answer is left.
    with pytest.raises(
        D.DataError,
        match=r"c\.jsonl:1: nothing to train on within --max-length 6 "
        r"\(the first trained token is token 15\)",
    ):
        D.encode(ds, "causal-lm", tok, 6)
    assert D.cut_notice(enc, 16).startswith(f"{len(enc.cut)} of 4 training examples")
    assert D.cut_notice(full, 64) is None


# ---- TRL -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["word-level", "chatml-bpe"])
def test_same_tokens_trained_as_trl_sft_trainer_with_assistant_only_loss(base, chatml, tmp_path, kind):
    """TRL's SFTTrainer(assistant_only_loss=True), its dataset preparation and data collator, on
    a template with generation marks: the same ids and labels as ours, through either way of
    finding the turns (the marks, or the same template without them rendered turn by turn)."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")

    tokenizer, marked, unmarked, conversations = {
        "word-level": (base, MARKED, UNMARKED, CONVERSATIONS),
        "chatml-bpe": (chatml, CHATML_MARKED, CHATML, CHATML_CONVERSATIONS),
    }[kind]
    marked, unmarked = with_template(tokenizer, marked), with_template(tokenizer, unmarked)
    model = tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "trl"), assistant_only_loss=True, report_to="none", use_cpu=True, max_length=None
    )
    rows = [{"messages": m} for m in conversations]
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=marked
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    for row, messages in enumerate(conversations):
        width = int(batch["attention_mask"][row].sum())
        theirs = (batch["input_ids"][row, :width].tolist(), batch["labels"][row, :width].tolist())
        assert chat.encode_conversation(messages, marked, "c.jsonl:1") == theirs
        assert chat.encode_conversation(messages, unmarked, "c.jsonl:1") == theirs
        # Not all masked: each assistant turn ends in a trained end-of-turn token.
        runs = trained_runs(theirs[1])
        assert len(runs) == sum(m["role"] == "assistant" for m in messages)
        assert all(run[-1] == tokenizer.eos_token_id for run in runs)
