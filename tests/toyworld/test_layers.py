"""The toy world's modules form layers: each imports only modules below it, and none grows past 500 lines."""
import ast
from pathlib import Path

import llama2.toyworld

# Lowest first. The facade (world) may import everything, the package's __init__ re-exports.
ORDER = ["expr", "vocab", "text", "facts", "tasks", "pools", "judges", "dialogs", "annotate", "corpus", "files",
         "world"]
PACKAGE = Path(llama2.toyworld.__file__).parent


def _package_imports(path: Path) -> set[str]:
    """The sibling modules a module imports (``from .x import ...``, ``from . import x``), lazy imports too."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return out


def test_every_module_is_in_the_order():
    assert {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"} == set(ORDER)


def test_lower_modules_never_import_higher_ones():
    for i, name in enumerate(ORDER):
        imported = _package_imports(PACKAGE / f"{name}.py")
        higher = [m for m in imported if ORDER.index(m) >= i]
        assert not higher, f"{name} imports {higher}, which are not below it"


def test_no_module_is_too_long():
    for path in PACKAGE.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 500, path.name
