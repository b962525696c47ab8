"""The package's layers point one way (DESIGN.md §1): no import cycles, data never imports the RLHF or training
code, the model never imports generation, library code never imports the CLI, and no function of the stages, the
RLHF arithmetic, the evaluation or the CLI is over 100 lines."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "llama2"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """llama2 modules imported by this file at run time (imports under `if TYPE_CHECKING:` are type-only)."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("llama2")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("llama2"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}
    modules = {_module_name(p) for p in PKG.rglob("*.py")}
    return {m for m in out if m in modules and m != name}


GRAPH = {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def _reaches(start: str, target_prefix: str) -> list[str] | None:
    """A chain of imports from ``start`` to a module under ``target_prefix``, if any."""
    seen, stack = set(), [(start, [start])]
    while stack:
        mod, chain = stack.pop()
        for nxt in GRAPH.get(mod, ()):
            if nxt == target_prefix or nxt.startswith(target_prefix + "."):
                return chain + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, chain + [nxt]))
    return None


def test_no_import_cycles():
    for mod, deps in GRAPH.items():
        for dep in deps:
            if dep.startswith(mod + ".") or mod.startswith(dep + "."):
                continue  # a package and its own submodules
            chain = _reaches(dep, mod)
            assert chain is None or any(c.startswith(mod + ".") for c in chain[:-1]), f"cycle: {mod} -> {' -> '.join(chain)}"


@pytest.mark.parametrize("lower,higher", [
    ("llama2.data", "llama2.rlhf"), ("llama2.data", "llama2.train"), ("llama2.data", "llama2.eval"),
    ("llama2.model", "llama2.generation"), ("llama2.rlhf", "llama2.train"), ("llama2.eval", "llama2.pipeline"),
    ("llama2.toyworld", "llama2.train"),
])
def test_lower_layers_never_import_higher_ones(lower, higher):
    for mod in [m for m in GRAPH if m == lower or m.startswith(lower + ".")]:
        assert _reaches(mod, higher) is None, f"{mod} reaches {higher}: {_reaches(mod, higher)}"


def test_library_code_never_imports_the_cli():
    for mod, deps in GRAPH.items():
        if mod != "llama2.cli":
            assert "llama2.cli" not in deps, mod


@pytest.mark.parametrize("folder", ["train", "rlhf", "eval", "cli.py", "pipeline.py"])
def test_no_function_over_100_lines(folder):
    paths = [PKG / folder] if folder.endswith(".py") else sorted((PKG / folder).rglob("*.py"))
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                assert n <= 100, f"{path.name}:{node.lineno} {node.name} has {n} lines"
