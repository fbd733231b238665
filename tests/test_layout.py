"""The layout docs/ARCHITECTURE.md draws, checked on the sources: no module imports another's
private name, no import circle, the core imports no wing and nothing but torch, safetensors and
the standard library at import time, a wing never imports another wing and takes from the core
only public names and the internal API the architecture page lists (and reads only those names
from a module it imports whole), no folder over 15 modules, every module pinned by a test file of
its own or a row of the architecture page."""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import lorakit
from layout import SRC, imports, is_wing, module_uses, modules, wing_of

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"
CORE_LIBRARIES = {"torch", "safetensors", "__future__"}


def test_no_module_imports_a_private_name_of_another():
    private = [
        f"{i.source} imports {i.name} from {i.target}"
        for i in imports()
        if i.name and i.name.startswith("_") and not i.name.startswith("__") and i.target.startswith("lorakit")
    ]
    assert private == []


def test_no_import_circle():
    graph = defaultdict(set)
    for i in imports():
        if i.target in modules() and i.target != i.source and not i.source.startswith(i.target + "."):
            graph[i.source].add(i.target)  # a package's own __init__ is not a circle of its modules
    circles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_the_core_imports_no_wing_and_only_torch_and_safetensors():
    stdlib = set(sys.stdlib_module_names)
    wrong = []
    for i in imports():
        if is_wing(i.source) or i.source in ("lorakit", "lorakit.__main__"):  # the lazy table; `python -m lorakit`
            continue
        if i.target.startswith("lorakit"):
            if is_wing(i.target):
                wrong.append(f"{i.source} imports {i.target}")
        elif i.top and i.target.split(".")[0] not in stdlib | CORE_LIBRARIES:
            wrong.append(f"{i.source} imports {i.target} at import time")
    assert wrong == []


def test_a_wing_never_imports_another():
    crossing = [
        f"{i.source} imports {i.target}"
        for i in imports()
        if wing_of(i.source) not in (None, "lorakit.cli") and wing_of(i.target) not in (None, wing_of(i.source))
    ]
    assert crossing == []


def wing_api() -> dict[str, set[str]]:
    """The table under "## What the wings may use of the core": module -> names."""
    section = ARCHITECTURE.read_text().split("## What the wings may use of the core", 1)[1].split("\n## ", 1)[0]
    table = {}
    for row in re.findall(r"^\| `(lorakit[\w.]*)` \| (.+) \|$", section, re.M):
        table[row[0]] = set(re.findall(r"`(\w+)`", row[1]))
    return table


def test_the_wings_take_from_the_core_only_public_names_and_the_listed_api():
    public = {(lorakit._WHERE[n], n) for n in lorakit.__all__}
    listed = wing_api()
    assert listed, f"{ARCHITECTURE}: no table of the core's API for the wings"
    outside = sorted(
        f"{i.source}: {i.target}.{i.name or 'module'}"
        for i in imports()
        if is_wing(i.source)
        and i.target.startswith("lorakit")
        and not is_wing(i.target)
        and i.target != "lorakit"
        and (i.target, i.name) not in public
        and not (i.name in listed.get(i.target, set()) or (i.name is None and i.target in listed))
    )
    assert outside == []


def test_a_wing_reads_of_a_core_module_it_imports_whole_only_the_listed_names():
    listed = wing_api()
    outside = sorted(
        f"{u.source}: {u.target}.{u.name}"
        for u in module_uses()
        if is_wing(u.source) and not is_wing(u.target) and u.name not in listed.get(u.target, set())
    )
    assert outside == []


def test_no_module_reads_a_private_name_of_a_module_it_imports():
    assert [f"{u.source}: {u.target}.{u.name}" for u in module_uses() if u.name.startswith("_")] == []


def test_every_listed_name_exists():
    import importlib

    for module, names in wing_api().items():
        found = importlib.import_module(module)
        for name in names:
            assert hasattr(found, name), f"{module}.{name}"


@pytest.mark.parametrize("folder", sorted({p.parent for p in modules().values()}), ids=lambda p: p.name)
def test_no_folder_holds_more_than_15_modules(folder):
    assert len([p for p in folder.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]) <= 15


def pinned_table() -> str:
    return ARCHITECTURE.read_text().split("## Where each module's behaviour is pinned", 1)[1].split("\n## ", 1)[0]


def test_every_module_has_a_test_file_of_its_own_or_a_row_where_it_is_pinned():
    table = pinned_table()
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| `")]
    pinned = set(re.findall(r"`([\w/*.]+\.py)`", "\n".join(rows)))
    tests = Path(__file__).resolve().parent
    missing = []
    for path in modules().values():
        if path.name in ("__init__.py", "__main__.py"):
            continue
        relative = path.relative_to(SRC / "lorakit")
        own = tests / relative.parent / f"test_{relative.name}"
        folder_glob = f"{relative.parent.as_posix()}/*.py"
        if not own.exists() and relative.as_posix() not in pinned and folder_glob not in pinned:
            missing.append(relative.as_posix())
    assert missing == []
    for name in set(re.findall(r"`(tests/[\w/]+\.py)`", table)):
        assert (tests.parent / name).exists(), name
