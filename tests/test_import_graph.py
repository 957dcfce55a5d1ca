"""The package layout is a one-way flow (README "Layout"): every import of navit_dense, the
ones inside functions included, goes from a later stage to an earlier one

    utils -> data -> models -> losses -> evaluation -> engine -> tasks -> adapters

so the package graph has no cycle, evaluation never imports the engine or the tasks, the
engine never imports the tasks, and no ``_private`` name is imported across packages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "navit_dense"
ORDER = ("utils", "data", "models", "losses", "evaluation", "engine", "tasks", "adapters")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement in the file,
    at any depth, relative imports resolved."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, [a.name for a in node.names], node.lineno))
    return out


def top_package(module: str, root_name: str) -> str | None:
    """The stage a module belongs to ("data", "engine", ...), "" for the package root, None outside."""
    parts = module.split(".")
    if parts[0] != root_name:
        return None
    return parts[1] if len(parts) > 1 else ""


def edges(root: Path) -> list[tuple[str, str, str, list[str], int]]:
    """(importer package, imported package, file, names, line) across stages."""
    out = []
    for path in sorted(root.rglob("*.py")):
        src_pkg = top_package(module_name(path, root), root.name)
        for module, names, line in imports(path, root):
            dst_pkg = top_package(module, root.name)
            if dst_pkg is None:
                continue
            if dst_pkg == "" and names:  # `from navit_dense import data` names a stage
                for n in names:
                    out.append((src_pkg, n if n in ORDER else "", str(path.relative_to(root.parent)), [n], line))
            else:
                out.append((src_pkg, dst_pkg, str(path.relative_to(root.parent)), names, line))
    return [e for e in out if e[0] != e[1]]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
            if nxt not in state:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def violations(root: Path) -> list[str]:
    found = []
    graph: dict[str, set[str]] = {}
    rank = {p: i for i, p in enumerate(ORDER)}
    for src, dst, file, names, line in edges(root):
        where = f"{file}:{line}"
        graph.setdefault(src, set()).add(dst)
        if src == "":
            if dst not in ("data", "models"):  # the root re-exports the backbone API only
                found.append(f"{where}: the package root imports {dst or 'itself'}")
            continue
        if dst == "":
            found.append(f"{where}: {src} imports the package root (import the stage module instead)")
            continue
        if src in rank and dst in rank and rank[dst] > rank[src]:
            found.append(f"{where}: {src} imports {dst}, a later stage (flow: {' -> '.join(ORDER)})")
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private:
            found.append(f"{where}: {src} imports private name(s) {private} from {dst}")
    cycle = find_cycle(graph)
    if cycle:
        found.append(f"package import cycle: {' -> '.join(p or 'navit_dense' for p in cycle)}")
    return found


def test_navit_dense_imports_flow_one_way():
    assert violations(PACKAGE) == []


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    "files, expected",
    [
        # a lazy import inside a function still counts, and closes a cycle
        ({"engine/task.py": "def names():\n    from ..tasks import x\n", "tasks/x.py": "from ..engine import task\n"},
         ["engine imports tasks", "cycle"]),
        ({"evaluation/sweep.py": "from ..engine.trainer import train\n"}, ["evaluation imports engine"]),
        ({"models/heads/seg.py": "from ...data.packing import _assemble\n"}, ["private name(s) ['_assemble']"]),
        ({"adapters/mmseg/b.py": "from navit_dense.models.pyramid import _scale_stage\n"}, ["private name(s) ['_scale_stage']"]),
        ({"data/x.py": "import navit_dense.models.navit\n"}, ["data imports models"]),
        ({"tasks/det.py": "from ..engine.task import Task\nfrom ..models.heads import owl\n"}, []),
    ],
)
def test_the_checker_catches_each_violation(tmp_path, files, expected):
    root = tmp_path / "navit_dense"
    write(root, "__init__.py", "")
    for rel, text in files.items():
        write(root, rel, text)
    found = violations(root)
    assert len(found) == len(expected), found
    for want in expected:
        assert any(want in f for f in found), (want, found)
