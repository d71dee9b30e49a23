"""No import circle in src/: every import counts, at module level, under TYPE_CHECKING and inside
functions alike (a circle hidden from Python at run time is still one module knowing another that knows
it back)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, text: str, known: set[str], *, is_package: bool = False) -> set[str]:
    """The modules of ``known`` that module ``name`` (source ``text``) imports, anywhere in it."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            for alias in node.names:
                # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` imports mod
                target = f"{base}.{alias.name}"
                if target in known:
                    found.add(target)
                elif base in known:
                    found.add(base)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {
        name: imports_of(name, path.read_text(encoding="utf-8"), known, is_package=path.name == "__init__.py")
        for name, path in mods.items()
    }


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(g):
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(g[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_the_walk_sees_every_kind_of_import() -> None:
    """The walk itself: a module-level, a TYPE_CHECKING-only and a function-local relative import each
    make an edge, so a circle through any of them is found; without the last one there is none."""
    assert "lingua_scheduler.server.runtime" in graph()["lingua_scheduler.server.state"]
    made = {
        "pkg.a": "import pkg.b\n",
        "pkg.b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.c import X\n",
        "pkg.c": "def f() -> None:\n    from . import a\n",
    }
    known = set(made)
    edges = {name: imports_of(name, text, known) for name, text in made.items()}
    assert edges == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}
    assert cycles(edges) == [["pkg.a", "pkg.b", "pkg.c"]]
    edges["pkg.c"] = set()
    assert cycles(edges) == []


def test_no_import_cycle_in_src() -> None:
    found = cycles(graph())
    assert found == [], "import circles in src/: " + "; ".join(" <-> ".join(c) for c in found)
