"""The package layout holds: imports run one way (no circle, not even inside a function), no module grows past ~600
lines, and the CLI's commands stay thin (parse, call one library function, print)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fastcls"
# lower layers first; a module may import only from its own layer or below (within a layer: no circle)
LAYERS = [
    {"errors", "_faults", "files", "metrics", "budget", "imageio"},
    {"onnx_runtime", "runs", "runfiles", "doctor", "recipe", "weights", "hardware", "imbalance", "posthoc", "plots"},
    {"archs", "predict"},
    {"config"},
    {"submission", "tracking"},
    {"data"},
    {"train"},
    {"ensemble", "experiments"},
    {"inference"},
    {"report"},
    {"cli_options", "cli_table", "cli_scores", "cli_tools", "cli_cache", "cli", "__main__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_LINES = 610
MAX_COMMAND_LINES = 18  # a command's body after its imports: build the config, one library call, printing


def _modules():
    return sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG)


def _name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set:
    """Every fastcls module `path` imports, at the top or inside functions, as dotted names."""
    here = _name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "fastcls":
                continue
            for alias in node.names:  # `from . import data` imports a module
                sub = f"{mod}.{alias.name}"
                out.add(sub if (PKG.parent / sub.replace(".", "/")).exists() or
                        (PKG.parent / (sub.replace(".", "/") + ".py")).exists() else mod)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "fastcls"}
    return out - {_name(path)}


def _unit(module: str) -> str:
    """The layer unit of a dotted module name: the top-level module or package under fastcls."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: _name(p))
def test_imports_run_one_way(path):
    me = _unit(_name(path))
    assert me in LAYER, f"{_name(path)} is in no layer of this test: add its package to LAYERS"
    for target in _imports(path):
        other = _unit(target)
        if other == me or other == "__init__":
            continue
        assert LAYER[other] <= LAYER[me], f"{_name(path)} (layer {LAYER[me]}) imports {target} (layer {LAYER[other]})"


def test_no_import_circle():
    graph = {_name(p): _imports(p) for p in _modules()}
    known = set(graph)
    graph = {k: {t for t in v if t in known} for k, v in graph.items()}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("path", _modules(), ids=lambda p: _name(p))
def test_module_size(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{_name(path)} has {n} lines: split it by concern"


def test_cli_commands_are_thin():
    commands = [n for f in ("cli.py", "cli_tools.py") for n in ast.walk(ast.parse((PKG / f).read_text()))]
    for fn in (n for n in commands if isinstance(n, ast.FunctionDef) and n.name.endswith("_cmd")):
        body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) else fn.body  # the docstring is --help, not logic
        body = [n for n in body if not isinstance(n, (ast.Import, ast.ImportFrom))]  # lazy imports keep --help fast
        lines = body[-1].end_lineno - body[0].lineno + 1
        assert lines <= MAX_COMMAND_LINES, f"{fn.name} has a {lines}-line body: move its logic into the library"
