"""The package's layers point one way (docs/ARCHITECTURE.md): no import cycles (type-only imports included), data
never imports the RLHF, training or evaluation code, the model never imports generation, evaluation never imports
training, inference is reached through its package's face only, no private name crosses a package's border,
library code never imports the CLI, no function is over 80 lines nor class over 250, and no docstring or comment
carries a measured figure or a date."""
import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "llama2"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p) for p in PKG.rglob("*.py")}


def _import_edges(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every llama2 import of this file: run-time, lazy (inside a
    function) and type-only (under ``if TYPE_CHECKING:``) alike, since each is a dependency a reader must follow."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("llama2")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("llama2"):
                out.append((mod, [a.name for a in node.names]))
    return out


def _imports(path: Path) -> set[str]:
    """The llama2 modules this file imports (a ``from package import module`` counts as the module)."""
    name = _module_name(path)
    out = set()
    for mod, names in _import_edges(path):
        out.add(mod)
        out |= {f"{mod}.{n}" for n in names}
    return {m for m in out if m in MODULES and m != name}


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
    ("llama2.model", "llama2.generate"), ("llama2.generate", "llama2.rlhf"), ("llama2.generate", "llama2.train"),
    ("llama2.generate", "llama2.serve"), ("llama2.rlhf", "llama2.train"), ("llama2.rlhf", "llama2.eval"),
    ("llama2.eval", "llama2.train"), ("llama2.eval", "llama2.pipeline"), ("llama2.toyworld", "llama2.train"),
    ("llama2.dist", "llama2.train"),
])
def test_lower_layers_never_import_higher_ones(lower, higher):
    for mod in [m for m in GRAPH if m == lower or m.startswith(lower + ".")]:
        assert _reaches(mod, higher) is None, f"{mod} reaches {higher}: {_reaches(mod, higher)}"


def test_library_code_never_imports_the_cli():
    for mod, deps in GRAPH.items():
        if mod != "llama2.cli":
            assert "llama2.cli" not in deps, mod


def test_inference_is_reached_through_its_face_only():
    """Outside llama2/generate, code imports ``llama2.generate`` itself, never one of its submodules."""
    for path in PKG.rglob("*.py"):
        mod = _module_name(path)
        if mod == "llama2.generate" or mod.startswith("llama2.generate."):
            continue
        for dep in GRAPH[mod]:
            assert not dep.startswith("llama2.generate."), f"{mod} imports {dep}: import from llama2.generate"


def test_no_private_name_crosses_a_package_border():
    """A name or module with a leading underscore is used only inside the package that defines it: a helper two
    packages share is made public where it lives (or moved to where both import it)."""
    for path in PKG.rglob("*.py"):
        mod = _module_name(path)
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for target, names in _import_edges(path):
            home = target if target in MODULES and (PKG.parent / target.replace(".", "/") / "__init__.py").exists() \
                else target.rsplit(".", 1)[0]
            if home == package:
                continue
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            private += [p for p in target.split(".") if p.startswith("_")]
            assert not private, f"{mod} takes {private} from {target}"


def _lengths(kind):
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kind):
                yield path, node, node.end_lineno - node.lineno + 1


def test_no_function_over_80_lines():
    long = [f"{p.relative_to(PKG)}:{n.lineno} {n.name} ({k} lines)"
            for p, n, k in _lengths((ast.FunctionDef, ast.AsyncFunctionDef)) if k > 80]
    assert not long, long


def test_no_class_over_250_lines():
    long = [f"{p.relative_to(PKG)}:{n.lineno} {n.name} ({k} lines)" for p, n, k in _lengths(ast.ClassDef) if k > 250]
    assert not long, long


_FIGURE = re.compile(r"\b\d[\d.,]*\s?(ms|us|µs|tok/s|GB/s|MB/s|GFLOP/s|TFLOP/s)\b|\b\d[\d.]*\s?x (faster|slower)\b"
                     r"|\b20\d\d-\d\d-\d\d\b|\(README\b|\bcommit [0-9a-f]{7}\b")


def _prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a file."""
    out = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
           if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append((node.body[0].lineno, doc))
    return out


def test_no_docstring_or_comment_carries_a_measured_figure_or_a_date():
    """A docstring says what and why; figures belong in benchmarks/RESULTS.md, history in commit messages."""
    found = [f"{p.relative_to(PKG)}:{line}: {m.group(0)!r}" for p in sorted(PKG.rglob("*.py"))
             for line, text in _prose(p) for m in [_FIGURE.search(text)] if m]
    assert not found, found
