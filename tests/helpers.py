"""What tests share: one factory of tiny random Transformers models (in memory, or saved as a
folder with a word-level tokenizer), small data sets, and checks on models and adapters.

Nothing is downloaded: every model is built from its config with a fixed seed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

# ---- tiny models ---------------------------------------------------------------------------

# kind -> (config class, keyword arguments); every model is 2 blocks of width 32.
_MOE = dict(
    vocab_size=120,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts_per_tok=2,
)
MOE_KINDS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss")
_CONFIGS = {
    "bert": (
        "BertConfig",
        dict(
            vocab_size=120,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
    ),
    "gpt2": ("GPT2Config", dict(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "llama": (
        "LlamaConfig",
        dict(
            vocab_size=120,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
    ),
    # Mixture-of-Experts (Transformers 5: fused 3-D expert weights), 4 experts, top-2.
    "qwen3_moe": ("Qwen3MoeConfig", dict(_MOE, num_experts=4, moe_intermediate_size=16, head_dim=8)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(_MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24),
    ),
    "mixtral": ("MixtralConfig", dict(_MOE, num_local_experts=4, head_dim=8)),
    "olmoe": ("OlmoeConfig", dict(_MOE, num_experts=4, pad_token_id=1, eos_token_id=2)),
    "gpt_oss": (
        "GptOssConfig",
        dict(
            _MOE,
            num_local_experts=4,
            intermediate_size=16,
            head_dim=8,
            layer_types=["full_attention", "sliding_attention"],
            sliding_window=8,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
    ),
}
# (kind, head) -> model class; head "classify" is a sequence classifier, "base" the bare encoder.
_CLASSES = {
    ("bert", "classify"): "BertForSequenceClassification",
    ("bert", "base"): "BertModel",
    ("gpt2", "causal-lm"): "GPT2LMHeadModel",
    ("llama", "causal-lm"): "LlamaForCausalLM",
    ("qwen3_moe", "causal-lm"): "Qwen3MoeForCausalLM",
    ("qwen2_moe", "causal-lm"): "Qwen2MoeForCausalLM",
    ("mixtral", "causal-lm"): "MixtralForCausalLM",
    ("olmoe", "causal-lm"): "OlmoeForCausalLM",
    ("gpt_oss", "causal-lm"): "GptOssForCausalLM",
}
_DEFAULT_HEAD = {"bert": "classify", "gpt2": "causal-lm", "llama": "causal-lm"} | {k: "causal-lm" for k in MOE_KINDS}


def tiny_model(kind: str, *, head: str | None = None, seed: int = 0, **config) -> torch.nn.Module:
    """A tiny random `kind` model ("bert", "gpt2", "llama") in eval mode; `config` overrides
    its configuration (e.g. num_labels, vocab_size)."""
    import transformers

    config_class, defaults = _CONFIGS[kind]
    model_class = getattr(transformers, _CLASSES[(kind, head or _DEFAULT_HEAD[kind])])
    torch.manual_seed(seed)
    return model_class(getattr(transformers, config_class)(**(defaults | config))).eval()


def tiny_bert(num_labels: int = 3, seed: int = 0):
    return tiny_model("bert", seed=seed, num_labels=num_labels)


def tiny_gpt2(seed: int = 0):
    return tiny_model("gpt2", seed=seed)


def tiny_llama(seed: int = 0):
    return tiny_model("llama", seed=seed)


MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


class SwinLike(torch.nn.Module):
    """A model whose blocks are layers.N.blocks.M (Swin's nesting): 2 stages of 3 blocks, width 8."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        nn = torch.nn

        def block() -> nn.Module:
            b = nn.Module()
            b.attn = nn.Module()
            b.attn.qkv, b.attn.proj, b.mlp = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(8, 8)
            return b

        self.layers = nn.ModuleList()
        for _ in range(2):
            stage = nn.Module()
            stage.blocks = nn.ModuleList([block() for _ in range(3)])
            self.layers.append(stage)
        self.head = nn.Linear(8, 3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.layers:
            for b in stage.blocks:
                q, k, v = b.attn.qkv(x).chunk(3, dim=-1)
                x = x + b.attn.proj(torch.tanh(q * k) * v)
                x = x + b.mlp(torch.relu(x))
        return self.head(x)


class ConvToy(torch.nn.Module):
    """Token ids through an Embedding, a Linear, a Conv2d (3x3) and a Conv1d: every layer kind
    PEFT's DoRA and add_weighted_adapter handle, in one small model."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        nn = torch.nn
        self.emb = nn.Embedding(30, 12)
        self.lin = nn.Linear(12, 16)
        self.conv2 = nn.Conv2d(1, 6, 3, padding=1)  # 6 outputs: room for PEFT's rank-5 SVD (its conv reshape)
        self.conv1 = nn.Conv1d(6, 5, 3, padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin(self.emb(ids)))  # (batch, seq, 16)
        h = self.conv2(h[:, None])  # (batch, 6, seq, 16)
        return self.conv1(h.mean(2))  # (batch, 5, 16)


# ---- model checks --------------------------------------------------------------------------


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def randomize_adapter(model, name: str = "default", std: float = 0.2, seed: int = 1) -> None:
    """Give adapter `name` non-zero A and B, so comparisons cannot pass trivially."""
    import lorakit

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, lorakit.LoraLayer) and name in module.adapter_names:
                for p in module.adapter_parameters(name).values():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)


def snapshot(model) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Module structure and every tensor, to check that a failed call changed nothing."""
    structure = [f"{n}:{type(m).__name__}" for n, m in model.named_modules()]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return structure, state


def assert_unchanged(model, before: tuple[list[str], dict[str, torch.Tensor]]) -> None:
    structure, state = snapshot(model)
    assert structure == before[0]
    assert state.keys() == before[1].keys()
    for k in state:
        assert torch.equal(state[k], before[1][k]), k


# ---- model folders with a tokenizer --------------------------------------------------------

POSITIVE = "good great nice lovely fine superb excellent happy".split()
NEGATIVE = "bad awful poor terrible sad horrid dull broken".split()
FILLER = "the film food phone was is very quite really and but so".split()
DIGITS = [str(i) for i in range(20)]
EXTRA = "count from to : next list please answer".split()
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
VOCAB = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER + DIGITS + EXTRA))


def make_tokenizer(folder: Path):
    """A word-level tokenizer over VOCAB, saved in `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    tok.save_pretrained(folder)
    return tok


# Folder models: VOCAB-sized, no dropout, the tokenizer's special ids.
_FOLDER_CONFIGS = {
    "bert": dict(
        num_attention_heads=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        initializer_range=0.2,
    ),
    "llama": dict(pad_token_id=0, bos_token_id=2, eos_token_id=3),
    **{kind: dict(pad_token_id=0, bos_token_id=2, eos_token_id=3) for kind in MOE_KINDS},
    "gpt2": dict(
        n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=2, eos_token_id=3
    ),
}


def make_model(folder: Path, kind: str, seed: int = 0) -> Path:
    """Save a tiny random `kind` ("bert" as a bare encoder, "llama", "gpt2", "qwen3_moe") and the
    tokenizer in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder)
    head = "base" if kind == "bert" else None
    tiny_model(kind, head=head, seed=seed, vocab_size=len(VOCAB), **_FOLDER_CONFIGS[kind]).save_pretrained(folder)
    return folder


# ---- adapter folders -----------------------------------------------------------------------

LABELS = ("neg", "pos")


def make_adapter(
    base: Path,
    out: Path,
    task: str,
    seed: int,
    rank: int = 4,
    targets="all-linear",
    labels: tuple[str, ...] = LABELS,
    expert_layout: str = "fused",
    **config,
) -> Path:
    """An adapter folder on `base` with random nonzero weights (and, for a classifier, its own head);
    `config`: more LoraConfig fields (target_parameters)."""
    import lorakit
    from lorakit.training.base_model import load_model
    from lorakit.training.labels import labels_json

    model = load_model(str(base), task, list(labels) if task == "classify" else None)
    saved = ["classifier"] if task == "classify" else []
    lorakit.inject(
        model, lorakit.LoraConfig(rank=rank, alpha=2 * rank, targets=targets, modules_to_save=saved, **config)
    )
    randomize_adapter(model, seed=seed)
    if saved:
        with torch.no_grad():
            for p in model.classifier.copies["default"].parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    extra = {"labels.json": labels_json(list(labels))} if task == "classify" else None
    lorakit.save_adapter(
        model,
        out,
        base_model_name_or_path=str(base),
        task_type="SEQ_CLS" if task == "classify" else "CAUSAL_LM",
        extra_files=extra,
        expert_layout=expert_layout,
    )
    return out


# ---- data ----------------------------------------------------------------------------------


def classify_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if positive else NEGATIVE))
        rows.append({"text": " ".join(words), "label": "pos" if positive else "neg"})
    return rows


def completion_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randint(0, 15)
        rows.append({"prompt": f"count from {start} :", "completion": " ".join(str(start + k) for k in (1, 2, 3))})
    return rows


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in completion_rows(n, seed)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict], sep: str = ",") -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=sep)
        writer.writeheader()
        writer.writerows(rows)
    return path


# ---- running training ----------------------------------------------------------------------


def bert_train_args(tiny, out: Path | str, *more: str, steps: int | None = None) -> list[str]:
    """`lorakit train` on the tiny BERT classifier and its data, into `out`, then `more`; with
    `steps`, a short run: batches of 8, one thread, at most `steps` steps."""
    short = ["--batch-size", "8", "--threads", "1", "--max-steps", str(steps)] if steps is not None else []
    return ["train", "--model", str(tiny["bert"]), "--data", str(tiny["classify"]), "--out", str(out), *short, *more]


def train_tiny(tiny, out: Path, **options) -> dict:
    """Train in this process on a tiny model; returns the summary."""
    from lorakit.training import RunConfig, train

    defaults = dict(
        model=str(tiny["bert"]), data=str(tiny["classify"]), out=str(out), batch_size=8, epochs=1, lr=1e-2, threads=1
    )
    defaults.update(options)
    overwrite = defaults.pop("overwrite", False)
    return train(RunConfig(**defaults), overwrite=overwrite, stream=io.StringIO())


def whole_and_resumed(tiny, root: Path, monkeypatch, **options) -> tuple[Path, Path]:
    """Train `options` twice under `root`: "whole" in one go, "cut" killed right after its first
    checkpoint (--save-every) and resumed. Returns both folders, to compare bit for bit."""
    import pytest

    from lorakit.training import loop
    from lorakit.training.options import read_run

    train_tiny(tiny, root / "whole", **options)
    real = loop._Run._save_checkpoint

    def stop_after_saving(self):
        real(self)
        raise KeyboardInterrupt  # as if killed right after the checkpoint

    monkeypatch.setattr(loop._Run, "_save_checkpoint", stop_after_saving)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(tiny, root / "cut", **options)
    monkeypatch.undo()
    loop.train(read_run(root / "cut"), resume=True, stream=io.StringIO())
    return root / "whole", root / "cut"


def ctrl_c_reaches_it() -> None:
    """Popen's preexec_fn for a child the test will interrupt: SIGINT back to its default action.
    A shell starts background jobs with SIGINT ignored and children inherit that, so a suite run
    from a background job (`make test &`, some CI runners) would otherwise send Ctrl-C to no one."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args: str, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    """`python -m lorakit ARGS` in a subprocess."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, timeout=timeout, env=env, **kw
    )


def cli_here(capsys, *args: str) -> tuple[int, str, str]:
    """`lorakit ARGS` in this process: (exit status, stdout, stderr)."""
    from lorakit.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder's weight file."""
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def files_of(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), to check that a refused command
    changed nothing; `skip`: names to leave out."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and p.name not in skip
    }


# ---- float32 comparisons -------------------------------------------------------------------

# A logit of a tiny model (2 blocks of width 32, MLP 64, 9 tokens) ends a chain of reductions:
# per block q/k/v (32), scores (8 per head), the weighted sum (9), the output (32), MLP up (32)
# and down (64), plus two norms (32 each); then the head (32). About 2 * 240 + 32: 500.
TINY_MODEL_N = 500


def assert_rounding_close(
    got: torch.Tensor, want: torch.Tensor, *, n: int, scale: float | None = None, msg: str | None = None
) -> None:
    """`got` and `want` compute the same numbers two ways that differ only in rounding (another
    order of sums, a fused kernel, a merged weight, another library): they must agree within
    8 * eps * sqrt(n) * scale, elementwise.

    eps: the machine epsilon of the less precise dtype of the two (2**-23 for float32; `want` may
    be a float64 reference). n: the length of the reductions behind each value (for a chain, the
    sum of their lengths; a whole tiny model is TINY_MODEL_N). scale: the magnitude of the values
    compared (default: the largest |want|).

    Why: a float32 sum of n terms carries a rounding error of about sqrt(n) * eps times its
    magnitude (Higham and Mary's probabilistic bound; the blocked sums of BLAS kernels do
    better), whichever order the CPU's kernels (AVX2, AVX-512, none) and the thread count pick,
    while a fixed tolerance (1e-5) breaks on longer sums or larger values. The largest error
    measured over the whole suite, in units of eps * sqrt(n) * scale, was 1.22 (plain, and under
    ATEN_CPU_CAPABILITY=default and avx2, on 1, 2 and 4 threads; LORAKIT_TOL_LOG=FILE records
    them): 8 leaves a margin above 6, and a real bug (a missing scale, one adapter too many, 1e-4
    of the output) is far above it.
    """
    low = got.dtype if torch.finfo(got.dtype).eps > torch.finfo(want.dtype).eps else want.dtype
    eps = torch.finfo(low).eps
    if scale is None:
        scale = want.detach().abs().max().item() if want.numel() else 0.0
    atol = 8 * eps * n**0.5 * scale
    _log_ratio(got, want, eps * n**0.5 * scale)
    torch.testing.assert_close(got, want, rtol=0, atol=atol, check_dtype=False, msg=msg)


def _log_ratio(got: torch.Tensor, want: torch.Tensor, unit: float) -> None:
    """With LORAKIT_TOL_LOG=FILE, append the test, the calling line and the largest difference in
    units of eps * sqrt(n) * scale: how the margin of assert_rounding_close is measured on a CPU."""
    path = os.environ.get("LORAKIT_TOL_LOG")
    if not path:
        return
    import inspect

    caller = inspect.stack()[2]
    diff = (got.detach().double() - want.detach().double()).abs().max().item() if want.numel() else 0.0
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    where = f"{os.path.basename(caller.filename)}:{caller.lineno}"
    with open(path, "a") as f:
        f.write(f"{test} {where} {diff / unit if unit else 0.0:.4g}\n")
