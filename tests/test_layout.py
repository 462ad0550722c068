"""The package's shape: data flows one way (no import cycle), and the two rooms stay apart
(`models/` knows no web code, `api/` no tensors). Read from the source with `ast`, so every
import counts, including those inside functions and `if TYPE_CHECKING:` blocks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "voxtral_server"
WEB = ("fastapi", "starlette", "uvicorn", "aiortc", "av", "websockets")
TENSORS = ("torch", "transformers", "silero_vad", "mistral_common")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(modules of this package that `name` imports, other top-level packages it imports)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    inside: set[str] = set()
    outside: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (inside if alias.name.startswith(PACKAGE) else outside).add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - node.level + 1]
                target = ".".join(stem + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith(PACKAGE):
                outside.add(target)
                continue
            for alias in node.names:  # `from . import protocol` names a module
                sub = f"{target}.{alias.name}"
                inside.add(sub if sub in known else target)
    outside = {o.split(".")[0] for o in outside if o}
    return {m for m in inside if m != name}, outside


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = {}
    third: dict[str, set[str]] = {}
    for name, path in mods.items():
        inside, outside = imports(name, path, known)
        unknown = inside - known
        assert not unknown, f"{name} imports modules that do not exist: {sorted(unknown)}"
        edges[name], third[name] = inside, outside
    return edges, third


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_itself_through_others() -> None:
    edges, _ = graph()
    assert len(edges) > 30, "the walk found too few modules: is SRC right?"
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above could pass by finding nothing at all: make sure it can fail."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_app_is_imported_by_nothing_but_the_entry_point() -> None:
    edges, _ = graph()
    importers = {m for m, targets in edges.items() if f"{PACKAGE}.api.app" in targets}
    assert importers <= {f"{PACKAGE}.cli"}, importers


@pytest.mark.parametrize(
    ("room", "forbidden"),
    [("models", WEB + (f"{PACKAGE}.api",)), ("api", TENSORS)],
)
def test_the_two_rooms_stay_apart(room: str, forbidden: tuple[str, ...]) -> None:
    edges, third = graph()
    prefix = f"{PACKAGE}.{room}"
    for name in edges:
        if not name.startswith(prefix):
            continue
        used = third[name] | edges[name]
        bad = sorted(u for u in used if any(u == f or u.startswith(f + ".") for f in forbidden))
        assert not bad, f"{name} imports {bad}"
