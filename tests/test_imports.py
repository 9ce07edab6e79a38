"""The import graph, read from the source (no module is imported): no cycles between modules, and
imports only run down the layers:

    3  qkvgguf.cli, qkvgguf.run_config, qkvgguf.inspect   (views and the command line)
    2  qkvgguf.convert                                    (Hugging Face -> GGUF; its imatrix runs the model)
    1  qkvgguf.runtime                                    (GGUF -> tokens)
    0  the core: gguf_file, quants, tokenizer, config, errors, units, default_model

Two thin public faces sit on the layer of what they expose: qkvgguf.torch (runtime/nn.py's modules:
layer 1) and qkvgguf.hf (transformers models over GGUF files, saved through the converter: layer 3).

Folders map to their installed names (pyproject.toml's package-dir): qkvgguf/ -> qkvgguf,
convert/ -> qkvgguf.convert, runtime/ -> qkvgguf.runtime. Every import counts, module-level or
inside a function: a lazy import hides a cycle from the interpreter, not from the reader.

One kind of edge is left out: a module importing its own package (`from . import register` in
qkvgguf/quants/q4.py), since a package's __init__ that imports its submodules to register them is
the registry pattern, not a loop of knowledge. The package's edges to its submodules are kept.

Optional dependencies (OPTIONAL: transformers, the `hf` extra) are imported only by the modules that
use them, only inside functions; one test also imports the package in a fresh interpreter and looks.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"qkvgguf": "qkvgguf", "convert": "qkvgguf.convert", "runtime": "qkvgguf.runtime"}
LAYERS = {"qkvgguf.runtime": 1, "qkvgguf.convert": 2, "qkvgguf.cli": 3, "qkvgguf.__main__": 3,
          "qkvgguf.run_config": 3, "qkvgguf.inspect": 3, "qkvgguf.llm": 3,
          "qkvgguf.serve": 3, "qkvgguf.cli_run": 3, "qkvgguf.chat_repl": 3, "qkvgguf.cli_bench": 3,
          "qkvgguf.torch": 1, "qkvgguf.hf": 3}  # anything else under qkvgguf: 0, the core
# The package's own facade: `from qkvgguf import LLM` is the documented entry point, so the package
# __init__ (layer 0) names the layer-3 class, lazily (module __getattr__: `import qkvgguf` loads no
# runtime). This one edge is allowed; anything else from the core upward still fails.
FACADE = {("qkvgguf", "qkvgguf.llm")}


def modules() -> dict[str, Path]:
    """installed module name -> source file."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            out[name] = path
    return out


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules that `path` (module `name`) imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()

    def add(target: str):
        # the longest known prefix: `qkvgguf.quants.dequantize` names the module qkvgguf.quants
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            for alias in node.names:  # `from . import kquants` imports a module, `from .x import f` a name
                add(f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem)
    # a module importing one of its own parent packages: the registry pattern (see the docstring)
    return {t for t in found if not name.startswith(t + ".")}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_project():
    g = graph()
    assert {"qkvgguf.gguf_file", "qkvgguf.convert.mixed", "qkvgguf.runtime.model"} <= set(g)
    assert "qkvgguf.config" in g["qkvgguf.runtime.model"]  # absolute import
    assert "qkvgguf.convert.checkpoint" in g["qkvgguf.convert.stream"]  # relative `from .checkpoint import`
    assert "qkvgguf.quants.kquants" in g["qkvgguf.quants"]  # `from . import kquants` names a module


def test_the_checks_can_fail():
    """The cycle finder and the layering rule on a made-up graph."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert upward({"qkvgguf.config": {"qkvgguf.runtime.model"}, "qkvgguf.runtime.model": {"qkvgguf.config"},
                   "qkvgguf.quants": {"qkvgguf.inspect.tensor"}, "qkvgguf.inspect.memory": {"qkvgguf.runtime.planner"},
                   "qkvgguf.runtime.planner": {"qkvgguf.convert.mixed"}}) \
        == ["qkvgguf.config -> qkvgguf.runtime.model", "qkvgguf.quants -> qkvgguf.inspect.tensor",
            "qkvgguf.runtime.planner -> qkvgguf.convert.mixed"]
    assert upward({"qkvgguf": {"qkvgguf.llm", "qkvgguf.cli"}}) == ["qkvgguf -> qkvgguf.cli"]  # only the facade


def test_lazy_imports_count(tmp_path):
    """A function-level import is an edge like any other (this is what hid the converter's loop)."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from qkvgguf.runtime import model\n    from .errors import QkvggufError\n")
    known = {"qkvgguf.m": src, "qkvgguf.runtime.model": src, "qkvgguf.errors": src, "qkvgguf.runtime": src}
    assert imported("qkvgguf.m", src, known) == {"qkvgguf.runtime.model", "qkvgguf.errors"}


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def layer(name: str) -> int:
    for prefix, n in LAYERS.items():
        if name == prefix or name.startswith(prefix + "."):
            return n
    return 0


def upward(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in g.items() for b in targets
                  if layer(b) > layer(a) and (a, b) not in FACADE)


def test_imports_run_down_the_layers():
    found = upward(graph())
    assert not found, "imports from a lower layer to a higher one (see the docstring): " + ", ".join(found)


# -- optional dependencies -------------------------------------------------------------------------
# package -> the modules that may import it, and only inside functions (`pip install 'qkvgguf[hf]'`)
OPTIONAL = {"transformers": {"qkvgguf.hf"}}


def third_party(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level package, line, at module level) of every import of another distribution in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    module_level = {id(n) for n in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` / try blocks at module level still run at import
        if isinstance(node, (ast.If, ast.Try)):
            module_level |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out += [(n.split(".")[0], node.lineno, id(node) in module_level) for n in names]
    return out


def optional_violations(known: dict[str, Path]) -> list[str]:
    bad = []
    for name, path in known.items():
        for package, line, top in third_party(path):
            if package in OPTIONAL and (name not in OPTIONAL[package] or top):
                where = "at module level" if top else "outside " + ", ".join(sorted(OPTIONAL[package]))
                bad.append(f"{path.relative_to(path.parents[1])}:{line} imports {package} {where}")
    return bad


def test_optional_dependencies_are_imported_only_where_used():
    """transformers (an extra) is imported by qkvgguf.hf alone, inside its functions: `import qkvgguf`
    and `import qkvgguf.hf` work without it."""
    found = optional_violations(modules())
    assert not found, "; ".join(found)
    assert any(p == "transformers" for p, _, _ in third_party(modules()["qkvgguf.hf"]))  # the walk sees it


def test_the_optional_check_can_fail(tmp_path):
    pkg = tmp_path / "qkvgguf"
    pkg.mkdir()
    (pkg / "hf.py").write_text("import transformers\n")
    (pkg / "cli.py").write_text("def f():\n    from transformers import AutoModel\n")
    (pkg / "ok.py").write_text("import numpy\n")
    known = {"qkvgguf.hf": pkg / "hf.py", "qkvgguf.cli": pkg / "cli.py", "qkvgguf.ok": pkg / "ok.py"}
    assert optional_violations(known) == ["qkvgguf/hf.py:1 imports transformers at module level",
                                          "qkvgguf/cli.py:2 imports transformers outside qkvgguf.hf"]


def test_import_qkvgguf_loads_no_optional_package():
    """What the interpreter actually loads (whether or not transformers is installed)."""
    import subprocess
    import sys

    code = ("import sys, qkvgguf, qkvgguf.torch, qkvgguf.hf\n"
            f"loaded = sorted(p for p in {sorted(OPTIONAL)!r} if p in sys.modules)\n"
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
