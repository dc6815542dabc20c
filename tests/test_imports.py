"""bgtrain's modules import each other without cycles, counting function-level (lazy) imports too."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "bgtrain"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_nodes(tree: ast.AST, main: bool = False) -> list[ast.AST]:
    """Every node that can run on import: all except the bodies of ``if TYPE_CHECKING:`` (annotations only) and,
    unless ``main``, of ``if __name__ == "__main__":`` (it runs only under ``python -m``, never on import)."""
    skipped = ("TYPE_CHECKING", "typing.TYPE_CHECKING") + (() if main else ("__name__ == '__main__'",))
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and ast.unparse(node.test) in skipped:
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def import_graph(main: bool = False) -> dict[str, set[str]]:
    """module -> the bgtrain modules it imports anywhere in its body (an edge per exact module named); with
    ``main``, in its ``if __name__ == "__main__":`` block too."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in runtime_nodes(ast.parse(path.read_text(), str(path)), main):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # "from pkg import mod" names the submodule when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_lazy_imports_and_package_submodules():
    graph = import_graph()
    assert "bgtrain.engines.deepspeed" in graph["bgtrain.engines"]  # imported inside build_engine
    assert "bgtrain.losses.factory" in graph["bgtrain.losses"]
    assert "bgtrain.trainer" in graph["bgtrain.train"]  # imported inside run()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_in_bgtrain():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_main_block_imports_a_module_that_imports_it_back():
    """``python -m X`` runs X as ``__main__``; if that block imports a module importing X, X is loaded a second
    time as itself (two copies of its classes). ``bgtrain.config`` once handed its command line to
    ``bgtrain.config_docs`` that way."""
    cycle = find_cycle(import_graph(main=True))
    assert cycle is None, "import cycle through a __main__ block: " + " -> ".join(cycle)
