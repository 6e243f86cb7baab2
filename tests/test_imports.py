"""The package's modules import each other one way only: no two files import each other."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "aroma_peft"


def relative_imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (top level, in functions, under TYPE_CHECKING)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = package.split(".")[:len(package.split(".")) - node.level + 1]
            found.add(".".join(parts + ([node.module] if node.module else [])))
    return found


def test_no_two_modules_import_each_other():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = relative_imports(path)
    assert len(graph) > 20 and "aroma_peft.controller" in graph
    circles = sorted((a, b) for a in graph for b in graph[a] if a < b and a in graph.get(b, ()))
    assert circles == []
