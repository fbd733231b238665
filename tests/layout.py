"""The package's import graph, read from the sources (ast): what tests/test_layout.py checks."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
WINGS = ("lorakit.training", "lorakit.serving", "lorakit.cli")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the module imported from (a lorakit module, or a top-level package)
    name: str | None  # the name taken from it (None: the module itself)
    top: bool  # at module level (not inside a function)


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports() -> list[Import]:
    mods = modules()
    found = []
    for module, path in mods.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block) for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found.append(Import(module, alias.name, None, id(node) in top))
            elif isinstance(node, ast.ImportFrom):
                target = from_target(package, node)
                for alias in node.names:
                    if f"{target}.{alias.name}" in mods:  # `from . import registry`: a module
                        found.append(Import(module, f"{target}.{alias.name}", None, id(node) in top))
                    else:
                        found.append(Import(module, target, alias.name, id(node) in top))
    return found


def from_target(package: str, node: ast.ImportFrom) -> str:
    """The module a `from ... import` reads from, relative imports resolved against `package`."""
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def is_wing(module: str) -> bool:
    return any(module == w or module.startswith(w + ".") for w in WINGS)


def wing_of(module: str) -> str | None:
    return next((w for w in WINGS if module == w or module.startswith(w + ".")), None)


@dataclass(frozen=True)
class Use:
    source: str  # the module that reads the attribute
    target: str  # the lorakit module it imported whole
    name: str  # the attribute read from it


def module_uses() -> list[Use]:
    """Every `alias.NAME` read where `alias` is a lorakit module imported whole (`import
    lorakit.x as alias`, `from lorakit.files import peft_format as alias`, `from . import registry`)."""
    mods = modules()
    whole = {(i.source, i.target) for i in imports() if i.name is None and i.target in mods}
    found = []
    for module, path in mods.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and (module, alias.name) in whole:
                        aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                target = from_target(package, node)
                for alias in node.names:
                    if (module, f"{target}.{alias.name}") in whole:
                        aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                found.append(Use(module, aliases[node.value.id], node.attr))
    return found
