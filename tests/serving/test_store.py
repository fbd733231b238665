"""AdapterStore: registering reads only the config, loading is load_adapter's transaction, the
byte budget evicts the least recently used (never a pinned one or one in use), and a load costs
the same whatever the number of adapters already loaded."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from helpers import LABELS, assert_unchanged, randomize_adapter, snapshot
from torch import nn

import lorakit
from lorakit.serving import AdapterStore
from lorakit.training.base_model import load_model


@pytest.fixture
def model(adapters):
    return load_model(str(adapters["bert"]), "classify", list(LABELS)).eval()


def test_register_reads_only_the_config_and_checks_it_against_the_base(model, adapters, tmp_path):
    store = AdapterStore(model)
    broken = tmp_path / "broken"
    shutil.copytree(adapters["c"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    entry = store.register("c", broken)  # the weights are not read yet
    assert entry.file_bytes == len(b"not a safetensors file") and store.loaded == []

    foreign = tmp_path / "foreign"
    shutil.copytree(adapters["c"], foreign)
    config = json.loads((foreign / "adapter_config.json").read_text())
    (foreign / "adapter_config.json").write_text(json.dumps(dict(config, target_modules=["q_proj", "v_proj"])))
    with pytest.raises(lorakit.AdapterFileError, match=r"foreign/adapter_config.json: the adapter does not fit"):
        store.register("foreign", foreign)

    biased = tmp_path / "biased"
    shutil.copytree(adapters["c"], biased)
    (biased / "adapter_config.json").write_text(json.dumps(dict(config, bias="all")))
    with pytest.raises(lorakit.AdapterFileError, match="bias='all'"):
        store.register("biased", biased)
    with pytest.raises(ValueError, match="already registered"):
        store.register("c", adapters["c"])
    assert list(store.entries) == ["c"]


def test_a_failed_load_changes_nothing(model, adapters, tmp_path):
    store = AdapterStore(model)
    store.register("a", adapters["a"])
    store.load("a")
    broken = tmp_path / "broken"
    shutil.copytree(adapters["c"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")
    store.register("broken", broken)
    before = snapshot(model)
    failed = store.acquire(["broken", "a"])
    assert list(failed) == ["broken"] and "adapter_model.safetensors" in str(failed["broken"])
    assert_unchanged(model, before)
    assert store.loaded == ["a"] and store.failures == 1
    assert store.entries["broken"].error is not None


def test_the_byte_budget_evicts_the_least_recently_used(model, adapters):
    store = AdapterStore(model)
    for name in "abcd":
        store.register(name, adapters[name])
    sizes = {}
    for name in "abcd":
        store.load(name)
        sizes[name] = store.entries[name].loaded_bytes
        assert sizes[name] == sum(
            t.numel() * t.element_size() for t in lorakit.adapter_state_dict(model, name).values()
        )
    assert store.loaded_bytes == sum(sizes.values())
    for name in "abcd":
        store.unregister(name)
        store.register(name, adapters[name])
    assert store.loaded == [] and store.loaded_bytes == 0 and lorakit.adapters(model) == {}

    # Room for a and b (in bytes, not a count), a pinned.
    store.max_loaded_bytes = sizes["a"] + sizes["b"]
    store.pin("a")
    assert store.acquire(["a"]) == {} and store.acquire(["b"]) == {}
    assert store.loaded == ["a", "b"]
    store.acquire(["c"])  # b is the least recently used unpinned one
    assert store.loaded == ["a", "c"] and store.evictions == 1
    assert set(lorakit.adapters(model)) == {"a", "c"}
    store.acquire(["b", "d"])  # a batch needing more than the budget: both stay for it, c goes
    assert sorted(store.loaded) == ["a", "b", "d"]
    assert store.loaded_bytes == sizes["a"] + sizes["b"] + sizes["d"]
    store.acquire(["b"])  # the next call brings it back within budget
    assert store.loaded == ["a", "b"] and store.loaded_bytes <= store.max_loaded_bytes


def test_unregister_unloads(model, adapters):
    store = AdapterStore(model)
    store.register("a", adapters["a"])
    store.load("a")
    store.unregister("a")
    assert store.entries == {} and lorakit.adapters(model) == {}
    assert not any(isinstance(m, lorakit.LoraLayer) for m in model.modules())
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        store.load("a")


def test_a_load_walks_the_same_modules_however_many_adapters_are_loaded(model, adapters, monkeypatch):
    """What made loads slow down with each adapter (walks over every module and parameter of the
    model, adapters' own included; checks that loop over the adapters a layer holds) is gone:
    count the modules and parameters visited, and the Python calls made."""
    store = AdapterStore(model)
    for i in range(12):
        store.register(f"a{i}", adapters["a"])
    visited = [0]
    named_modules, named_parameters = nn.Module.named_modules, nn.Module.named_parameters

    def counting(original):
        def walk(self, *args, **kwargs):
            for item in original(self, *args, **kwargs):
                visited[0] += 1
                yield item

        return walk

    monkeypatch.setattr(nn.Module, "named_modules", counting(named_modules))
    monkeypatch.setattr(nn.Module, "named_parameters", counting(named_parameters))
    calls = [0]

    def profile(_frame, event, _arg):  # every Python function call (and generator step)
        if event == "call":
            calls[0] += 1

    counts, call_counts = [], []
    for i in range(12):
        visited[0] = calls[0] = 0
        sys.setprofile(profile)
        try:
            store.load(f"a{i}")
        finally:
            sys.setprofile(None)
        counts.append(visited[0])
        call_counts.append(calls[0])
    evictions = []
    for i in range(1, 12):  # and so does an eviction
        visited[0] = 0
        store.unregister(f"a{i}")
        evictions.append(visited[0])
    assert counts[2:] == [counts[2]] * 10, counts  # the first load also records the model's flags
    assert call_counts[2:] == [call_counts[2]] * 10, call_counts  # no loop over the loaded adapters either
    assert evictions == [evictions[0]] * 11, evictions


@pytest.mark.numeric
def test_loaded_adapters_serve_mixed_batches(model, adapters):
    store = AdapterStore(model)
    for name in "ab":
        store.register(name, adapters[name])
    store.acquire(["a", "b"])
    ids = torch.randint(4, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), lorakit.mixed_batch(model, ["b", "a"]):
        mixed = model(input_ids=ids).logits
    with torch.no_grad():
        lorakit.set_adapter(model, "a")
        alone = model(input_ids=ids).logits
    torch.testing.assert_close(mixed[1], alone[1], rtol=0, atol=1e-5 * alone.abs().max().item())


def _served_beside_a_lora(model, adapters, folder, std: float, **lora):
    """Train-like adapter `folder` (rank 4 on query/value plus the head, `lora` options) saved from
    its own model, then served by a store beside adapter "a": (the store, ids, rows of the mixed
    batch [folder, base, "a"], the trained model's output, the base model's output)."""
    trained = load_model(str(adapters["bert"]), "classify", list(LABELS)).eval()
    lorakit.inject(
        trained, lorakit.LoraConfig(rank=4, targets=["query", "value"], modules_to_save=["classifier"], **lora)
    )
    randomize_adapter(trained, std=std, seed=9)
    lorakit.save_adapter(trained, folder, task_type="SEQ_CLS")
    ids = torch.randint(4, 60, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        base = model(input_ids=ids).logits
    store = AdapterStore(model)
    store.register(folder.name, folder)
    store.register("a", adapters["a"])
    assert store.acquire([folder.name, "a"]) == {}
    with torch.no_grad(), lorakit.mixed_batch(model, [folder.name, None, "a"]):
        mixed = model(input_ids=ids).logits
    torch.testing.assert_close(mixed[0], expected[0], rtol=0, atol=1e-5 * expected.abs().max().item())
    assert torch.equal(mixed[1], base[1])
    assert (mixed[0] - base[0]).abs().max() > 1e-3  # the adapter does change the row
    return store, ids, base


@pytest.mark.numeric
def test_a_pissa_adapter_serves_beside_others_on_the_unchanged_base(model, adapters, tmp_path):
    """The store loads a PiSSA adapter as the plain LoRA it equals: its rows match the trained
    model, base rows stay the base model's to the bit, and other adapters still load."""
    store, ids, base = _served_beside_a_lora(model, adapters, tmp_path / "p", std=0.05, init="pissa")
    store.unregister("p")
    with torch.no_grad(), lorakit.mixed_batch(model, [None, None, None]):
        assert torch.equal(model(input_ids=ids).logits, base)


@pytest.mark.numeric
def test_a_dora_adapter_serves_beside_others(model, adapters, tmp_path):
    """A DoRA adapter from a folder loads into the store and its rows of a mixed batch match the
    trained DoRA model, beside a LoRA adapter's rows and base rows."""
    _served_beside_a_lora(model, adapters, tmp_path / "d", std=0.3, use_dora=True)
