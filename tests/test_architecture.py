"""The layout's rules, checked on the source: no import circle, layering, names said once.

docs/architecture.md states these rules; this module is what keeps them true.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "catsdogs"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> catsdogs modules it imports, counting imports inside functions too."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                while name and name not in files:
                    name = name.rsplit(".", 1)[0] if "." in name else ""
                # A package's __init__ that holds only a docstring adds no arrow; one that re-exports
                # names (the config package) is a module like any other.
                if name and name != mod and (files[name].name != "__init__.py" or _imports(files[name])):
                    graph[mod].add(name)
    return graph


def _imports(path: Path) -> bool:
    """True when a module's top level imports anything (beyond ``from __future__``)."""
    return any(isinstance(n, ast.Import | ast.ImportFrom) and getattr(n, "module", "") != "__future__"
               for n in ast.parse(path.read_text()).body)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    stack = [start]
    while stack:
        for nxt in graph[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def test_import_graph_is_built_from_the_real_tree() -> None:
    graph = import_graph()
    assert "catsdogs.train.loop" in graph and "catsdogs.rundir" in graph["catsdogs.train.loop"]
    assert sum(len(v) for v in graph.values()) > 100  # a graph this small would mean a parsing bug


def test_no_import_cycle() -> None:
    graph = import_graph()
    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if a in reachable(graph, b))
    assert not cycles, f"import circles: {cycles}"


def test_cycle_detector_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert "a" in reachable(graph, "a") and "d" not in reachable(graph, "a")


TRAINING = ("catsdogs.train.loop", "catsdogs.train.launch", "catsdogs.train.stream", "catsdogs.train.frozen")
"""The training machinery (the config may import train's light choice lists, like SCHEDULES)."""


@pytest.mark.parametrize(("source", "forbidden"), [
    ("catsdogs.serve.app", ("catsdogs.spark", "catsdogs.preprocess.", *TRAINING)),
    ("catsdogs.infer.predict", ("catsdogs.spark", "catsdogs.preprocess.", *TRAINING)),
    ("catsdogs.models.factory", ("catsdogs.cli", "catsdogs.config", "catsdogs.train.", "catsdogs.infer.")),
    ("catsdogs.train.stream", ("catsdogs.train.loop", "catsdogs.train.launch", "catsdogs.config")),
    ("catsdogs.shards.reader", ("catsdogs.train.", "catsdogs.config", "catsdogs.preprocess.")),
    ("catsdogs.preprocess.task",
     ("catsdogs.train.", "catsdogs.infer.", "catsdogs.serve.", "catsdogs.config")),
    # Tracking is stage-neutral: the stages call it, it knows none of them (its model uses the predictor).
    ("catsdogs.track.mlflow_run", ("catsdogs.train.", "catsdogs.evaluate.", "catsdogs.preprocess.",
                                   "catsdogs.serve.", "catsdogs.config", "catsdogs.cli")),
    # Engines run forward passes for train, infer and serve alike: they know none of them.
    ("catsdogs.engines.factory", ("catsdogs.train.", "catsdogs.infer.", "catsdogs.serve.",
                                  "catsdogs.evaluate.", "catsdogs.config", "catsdogs.cli", "catsdogs.spark")),
    ("catsdogs.engines.select", ("catsdogs.train.", "catsdogs.infer.", "catsdogs.serve.", "catsdogs.config")),
    # The forward passes on Spark know no stage's command: the stages call them with their work.
    *[(m, ("catsdogs.train.frozen", "catsdogs.train.launch", "catsdogs.evaluate.", "catsdogs.audit.",
           "catsdogs.preprocess.", "catsdogs.cli"))
      for m in ("catsdogs.cluster.shardjob", "catsdogs.cluster.work", "catsdogs.cluster.features")],
    ("catsdogs.engines.feature_cache", ("catsdogs.train.", "catsdogs.infer.", "catsdogs.serve.",
                                        "catsdogs.evaluate.", "catsdogs.config")),
    ("catsdogs.track.registry", ("catsdogs.train.", "catsdogs.evaluate.", "catsdogs.infer.",
                                 "catsdogs.serve.", "catsdogs.config", "catsdogs.cli")),
])
def test_layering(source: str, forbidden: tuple[str, ...]) -> None:
    """Serve never reaches Spark, models know no CLI, the loader knows nothing of the loop."""
    reached = reachable(import_graph(), source)
    bad = sorted(m for m in reached if m.startswith(forbidden) or m in forbidden)
    assert not bad, f"{source} reaches {bad}"


RUN_FOLDER_NAMES = ("best.pt", "last.pt", "metrics.csv", "report.html", "run_config.json", "model.onnx",
                    "mlflow.json")


def test_run_folder_names_are_spelled_in_rundir_only() -> None:
    spelled: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in RUN_FOLDER_NAMES:
                spelled.setdefault(str(node.value), []).append(module_name(path))
    assert set(spelled) == set(RUN_FOLDER_NAMES)
    assert {m for mods in spelled.values() for m in mods} == {"catsdogs.rundir"}, spelled


def test_cli_start_imports_neither_torch_nor_spark_nor_mlflow() -> None:
    """``catsdogs --help`` and every flag check must not pay for torch (~1.7 s), pyspark or mlflow."""
    code = ("import sys, catsdogs.cli; "
            "print(sorted(m for m in ('torch', 'pyspark', 'mlflow', 'openvino', 'onnxruntime') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_importing_the_config_imports_neither_numpy_nor_pil_nor_torch() -> None:
    """Every ``--help`` and flag error builds the config: it must not pay for the array and image stacks."""
    code = ("import sys, catsdogs.config; "
            "print(sorted(m for m in ('numpy', 'PIL', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


MAX_MODULE_LINES = 450
"""A module longer than this does more than one job (the layout's rule, docs/architecture.md)."""
MAX_FUNCTION_LINES = 60
"""A function longer than this hides steps that deserve names of their own."""


def test_no_module_over_450_lines_and_no_function_over_60() -> None:
    long_modules, long_functions = [], []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{module_name(path)}: {len(text.splitlines())}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{module_name(path)}.{node.name}: {lines}")
    assert not long_modules and not long_functions, (long_modules, long_functions)
