"""The layers of the code (README, "Code layout"), read from the source: every first-party import, lazy ones
inside functions included, goes to its own layer or a lower one; util/ holds only leaves (it imports nothing of
ours outside util/); the import graph has no cycle."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer and those below it, never one above.
LAYERS = [
    ("util", {"util"}),  # every util/*.py: data, checkpoints, schedules, logging; stdlib and third-party only
    ("models", {"abmilp", "poolers", "heads", "models_vit", "pretrain_models"}),
    ("engines", {"engine_linprobe", "engine_pretrain"}),
    ("configuration", {"config", "cli"}),
    ("entry points", {"main_linprobe", "main_attention_stats", "main_pretrain", "collect_results", "benchmarks"}),
]


def first_party_modules(root=ROOT):
    """{dotted name: path} of the repository's own modules (top level, util/, benchmarks/)."""
    paths = [*root.glob("*.py"), *root.glob("util/*.py"), *root.glob("benchmarks/*.py")]
    return {".".join(p.relative_to(root).with_suffix("").parts): p for p in paths}


def imported_names(source):
    """Every module name an import statement in `source` names, wherever it stands (functions included);
    `from package import name` yields both `package` and `package.name` (a submodule or an attribute)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports are not used here"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph(modules):
    """{module: set of first-party modules it imports} (`util` alone is the package's empty __init__)."""
    return {name: {n for n in imported_names(path.read_text()) if n in modules and n != "util.__init__"}
            - {name} for name, path in modules.items()}


def layer_of(module):
    top = module.split(".")[0]
    return next((i for i, (_, members) in enumerate(LAYERS) if top in members or module in members), None)


def cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


GRAPH = import_graph(first_party_modules())


def test_the_parser_sees_lazy_and_from_imports():
    source = "import os\nfrom util import dist\n\ndef f():\n    from models_vit import build_encoder\n"
    assert {"util", "util.dist", "models_vit"} <= imported_names(source)
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_has_a_layer():
    assert len(GRAPH) > 30
    assert [m for m in GRAPH if layer_of(m) is None] == []  # a new module is placed in LAYERS first


def test_util_imports_only_util():
    upward = {m: sorted(d for d in deps if not d.startswith("util."))
              for m, deps in GRAPH.items() if m.startswith("util.")}
    assert {m: d for m, d in upward.items() if d} == {}


def test_imports_go_down_the_layers():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
              for m, deps in sorted(GRAPH.items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert upward == []


def test_no_import_cycle():
    assert cycle(GRAPH) is None
