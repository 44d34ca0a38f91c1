"""Docs that cannot rot: the snippets of README.md and docs/ run, and every path they name exists.

Every ``python`` and shell (``bash``/``sh``) snippet runs here, in a folder that holds what the docs
call ``runs/quick`` (a small trained run), ``shards``, ``photos/`` and ``cat.jpg``, unless the line
before its fence marks it as one that cannot run here::

    <!-- cluster only: needs a Spark cluster and shared storage -->
    <!-- not run by the tests: the whole pipeline on the real data (minutes) -->

A marked snippet is still checked: each ``catsdogs`` command in it must name a real sub-command and
real flags, each ``make`` target and ``python -m`` module of the project must exist, and a Python
snippet must compile and import only what exists. TOML snippets must be valid configs.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

import catsdogs
from catsdogs import cli
from catsdogs.config import build_config
from tests.fixtures import jpeg_bytes, make_shards, synthetic_image

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL = frozenset({"bash", "sh", "shell"})
PYTHON = frozenset({"python", "py"})
MARK = re.compile(r"<!--\s*(cluster only|not run by the tests):\s*(\S.*?)\s*-->")
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)")
SNIPPET_TIMEOUT_S = 300


@dataclass(frozen=True)
class Snippet:
    """One fenced code block of a doc."""

    doc: Path
    line: int
    lang: str
    code: str
    mark: str
    """Why it is not run ('' when it is)."""

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def snippets(doc: Path) -> list[Snippet]:
    """The fenced blocks of ``doc``, with the mark on the line before each fence."""
    lines = doc.read_text().splitlines()
    found: list[Snippet] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = len(m.group(1)), m.group(2).lower(), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i][indent:])
            i += 1
        before = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        mark = MARK.search(before)
        found.append(Snippet(doc, start + 1, lang, "\n".join(body) + "\n",
                             f"{mark.group(1)}: {mark.group(2)}" if mark else ""))
        i += 1
    return found


ALL = [s for doc in DOCS for s in snippets(doc)]
CODE = [s for s in ALL if s.lang in SHELL | PYTHON]
RUN = [s for s in CODE if not s.mark]


def test_the_docs_have_snippets_to_check() -> None:
    assert len(CODE) > 15 and any(s.doc.name == "README.md" and not s.mark and s.lang in PYTHON for s in CODE)
    assert all(s.mark.startswith(("cluster only:", "not run by the tests:")) for s in CODE if s.mark)


# ------------------------------------------------------------------------------- running them


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the names the docs use: shards/, runs/quick (trained, also as make run's
    runs/effnet_lite12_frozen), photos/, cat.jpg."""
    root = tmp_path_factory.mktemp("docs")
    make_shards(root / "shards", size=32)
    assert cli.main(["train", "--data", str(root / "shards"), "--output", str(root / "runs" / "quick"),
                     "--epochs", "1", "--threads", "1", "--batch-size", "32"]) == 0
    (root / "photos").mkdir()
    for i in range(3):
        (root / "photos" / f"{i}.jpg").write_bytes(jpeg_bytes(synthetic_image(i % 2, 48, seed=70 + i)))
    (root / "cat.jpg").write_bytes(jpeg_bytes(synthetic_image(0, 64, seed=99)))
    assert catsdogs.load(root / "runs" / "quick").engine  # the run's engine graphs, once, in this process
    # The README's "Use it" names the run make run writes: the same small run under that name.
    shutil.copytree(root / "runs" / "quick", root / "runs" / "effnet_lite12_frozen")
    return root


@pytest.mark.parametrize("snippet", RUN, ids=lambda s: s.id)
def test_every_unmarked_snippet_runs(snippet: Snippet, sandbox: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    argv = [sys.executable, "-c", snippet.code] if snippet.lang in PYTHON else \
        ["bash", "-euo", "pipefail", "-c", snippet.code]
    out = subprocess.run(argv, cwd=sandbox, env=env, capture_output=True, text=True,
                         timeout=SNIPPET_TIMEOUT_S)
    assert out.returncode == 0, f"{snippet.id} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"


# ------------------------------------------------------------------------------- checking them

ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
WRAPPERS = frozenset({"sudo", "env", "exec", "time", "nohup"})
SEPARATORS = frozenset({";", "&&", "||", "|", "&", "(", ")"})


def commands(code: str) -> list[list[str]]:
    """The simple commands of a shell snippet, as words (continuations joined, comments dropped)."""
    out: list[list[str]] = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            words = list(lexer)
        except ValueError:  # an unbalanced quote inside $(...): not a command line to check
            continue
        current: list[str] = []
        for word in [*words, ";"]:
            if word in SEPARATORS:
                if current:
                    out.append(current)
                current = []
            else:
                current.append(word)
    return out


def program(words: list[str]) -> list[str]:
    """The command without leading variable assignments, sudo/env, ``flock LOCK`` and ``timeout N``."""
    while words:
        if ASSIGNMENT.match(words[0]) or words[0] in WRAPPERS:
            words = words[1:]
        elif words[0] in ("flock", "timeout") and len(words) > 2:
            words = words[2:]
        else:
            break
    return words


def subparsers() -> dict[str, object]:
    action = next(a for a in cli.build_parser()._actions if a.dest == "command")
    return dict(action.choices)  # type: ignore[arg-type]


def catsdogs_problems(words: list[str]) -> list[str]:
    """What is wrong with one ``catsdogs ...`` command: an unknown sub-command or flag."""
    args = [w.strip("[]") for w in words[1:]]
    if not args or args[0] in ("--help", "-h", "--version"):
        return []
    parsers = subparsers()
    if args[0] not in parsers:
        return [f"no sub-command {args[0]!r}"]
    known = {o for a in parsers[args[0]]._actions for o in a.option_strings}  # type: ignore[attr-defined]
    return [f"{args[0]}: no flag {w.split('=')[0]}" for w in args[1:]
            if w.startswith("--") and w.split("=")[0] not in known]


MAKE_TARGETS = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def module_file(name: str) -> Path | None:
    """The file of a project module (``catsdogs.x``, ``benchmarks.x``, ``tests.x``), or None."""
    base = ROOT / "src" if name.split(".")[0] == "catsdogs" else ROOT
    path = base.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def top_level_names(path: Path) -> set[str]:
    """Names a module defines or imports at its top level (and its PEP 562 API names)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            for t in node.targets:
                if isinstance(t, ast.Name) and t.id == "_API" and isinstance(node.value, ast.Dict):
                    names |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
            if node.target.id == "_API" and isinstance(node.value, ast.Dict):
                names |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


PROJECT = ("catsdogs", "benchmarks", "tests")


def reference_problem(dotted: str) -> str:
    """What is wrong with a reference to a project module or a name in one ('' when it exists)."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        path = module_file(".".join(parts[:k]))
        if path is None:
            continue
        rest = parts[k:]
        if rest and rest[0] not in top_level_names(path) and module_file(".".join(parts[:k + 1])) is None:
            return f"{'.'.join(parts[:k])} has no {rest[0]!r}"
        return ""
    return f"no module {'.'.join(parts[:2])!r}"


def shell_problems(code: str) -> list[str]:
    problems: list[str] = []
    for words in map(program, commands(code)):
        if not words:
            continue
        exe = Path(words[0]).name
        if exe == "catsdogs":
            problems += catsdogs_problems(words)
        elif exe == "make":
            problems += [f"no make target {w!r}" for w in words[1:]
                         if not w.startswith("-") and "=" not in w and w not in MAKE_TARGETS]
        elif exe.startswith("python") and "-m" in words:
            module = words[words.index("-m") + 1]
            if module.split(".")[0] in PROJECT:
                problems += list(filter(None, [reference_problem(module)]))
                if module == "catsdogs.cli":
                    problems += catsdogs_problems(["catsdogs", *words[words.index("-m") + 2:]])
    return problems


def python_problems(code: str) -> list[str]:
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        return [f"does not compile: {exc}"]
    problems: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [reference_problem(a.name) for a in node.names if a.name.split(".")[0] in PROJECT]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT:
            problems += [reference_problem(f"{node.module}.{a.name}") for a in node.names]
    return [p for p in problems if p]


@pytest.mark.parametrize("snippet", CODE, ids=lambda s: s.id)
def test_every_snippet_names_only_what_exists(snippet: Snippet) -> None:
    found = python_problems(snippet.code) if snippet.lang in PYTHON else shell_problems(snippet.code)
    assert not found, f"{snippet.id}: {found}"


def test_the_checks_catch_rot() -> None:
    wrong = catsdogs_problems(["catsdogs", "train", "--data", "x", "--epoch", "3"])
    assert wrong == ["train: no flag --epoch"]
    assert catsdogs_problems(["catsdogs", "fit"]) == ["no sub-command 'fit'"]
    assert shell_problems("FOO=1 make runn\n") == ["no make target 'runn'"]
    assert python_problems("from catsdogs.cluster import standalone_cluster\n") == [
        "catsdogs.cluster has no 'standalone_cluster'"]
    assert python_problems("from catsdogs.cluster.standalone import standalone_cluster\n") == []
    assert reference_problem("catsdogs.train.stream.nope") == "catsdogs.train.stream has no 'nope'"


@pytest.mark.parametrize("snippet", [s for s in ALL if s.lang == "toml"], ids=lambda s: s.id)
def test_toml_snippets_are_valid_configs(snippet: Snippet) -> None:
    data = tomllib.loads(snippet.code)
    for command, table in (data.items() if all(isinstance(v, dict) for v in data.values()) else
                           [("train", data)]):
        build_config(cli.COMMANDS[command].config, table)


# ------------------------------------------------------------------------------- named paths

LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"^(?:src|tests|benchmarks|configs|docs)/[\w./*-]+"
                       r"|^(?:Makefile|pyproject\.toml|README\.md)$")
MODULE_REF = re.compile(r"^(?:catsdogs(?:\.\w+){2,}|benchmarks(?:\.\w+)+)$")
"""``catsdogs.<module>.<name>`` or deeper (``catsdogs.<word>`` is also how MLflow tags are spelled)."""


def named_problems(doc: Path) -> list[str]:
    """Links, repository paths (``src/...``, ``tests/x.py::test_y``) and module references that are gone."""
    text = doc.read_text()
    problems: list[str] = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        if not (doc.parent / target.split("#")[0]).exists():
            problems.append(f"link {target}")
    for span in CODE_SPAN.findall(text):
        token = span.strip().rstrip(".,:;)")
        path, _, test = token.partition("::")
        if REPO_PATH.match(path):
            hits = list(ROOT.glob(path.rstrip("/"))) if "*" in path else [ROOT / path.rstrip("/")]
            if not hits or not all(h.exists() for h in hits):
                problems.append(f"path {path}")
            elif test:
                name = test.split("[")[0].rstrip(".").removesuffix("...").rstrip("_")
                if not re.search(rf"^def {re.escape(name)}", hits[0].read_text(), re.M):
                    problems.append(f"test {token}")
        elif MODULE_REF.match(token):
            problem = reference_problem(token)
            if problem:
                problems.append(f"{token}: {problem}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_path_a_doc_names_exists(doc: Path) -> None:
    assert not named_problems(doc)


def test_no_doc_names_another_default_detector_than_the_config() -> None:
    """README once said Mahalanobis was the default while the config said knn."""
    from catsdogs.config import TrainConfig
    from catsdogs.models.ood_names import OOD_METHODS

    default = TrainConfig().ood_method
    claim = re.compile(rf"\b({'|'.join(OOD_METHODS)})\b\W{{0,3}} (?:by default|is the default)", re.I)
    wrong = [(d.name, m.group(0)) for d in DOCS for m in claim.finditer(d.read_text())
             if m.group(1).lower() != default]
    assert not wrong


# ------------------------------------------------------------------------------- named code

TOP_DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
"""The docs people read (the fragments in docs/benchmarks/ are written by the benchmarks)."""
DOTTED = re.compile(r"^[A-Za-z_]\w*(?:[./][A-Za-z_]\w*)+$")
FILE_SUFFIXES = frozenset({"json", "csv", "html", "onnx", "npz", "npy", "pt", "ts", "txt", "png", "py", "md",
                           "toml", "tsv", "zip", "parquet", "jpg", "jpeg", "key", "conf", "whl", "yaml", "sh",
                           "part", "db", "pem", "lock", "tmp", "so", "pth", "cfg", "log"})
SRC = ROOT / "src" / "catsdogs"
MODULE_NAMES = {p.stem for p in SRC.rglob("*.py") if p.stem != "__init__"} | {
    p.parent.name for p in SRC.rglob("__init__.py") if p.parent != SRC}
"""Names a doc may start a short reference with (``models.ood.OWN_SHARE``, ``guard.screened_check``)."""


def code_names(text: str) -> list[str]:
    """The dotted code names in a doc's backticks: ``catsdogs.x.y``, ``benchmarks.x`` and short forms that
    start with a catsdogs module (``models.ood.OWN_SHARE``, ``infer/prediction.Prediction``). File names
    (``best.pt``) and Spark settings (``spark.task.cpus``) are not code names."""
    found = []
    for span in CODE_SPAN.findall(text):
        token = span.strip().removesuffix("()").rstrip(".,:;")
        if not DOTTED.match(token) or token.rsplit(".", 1)[-1].lower() in FILE_SUFFIXES:
            continue
        first = re.split(r"[./]", token)[0]
        if first in ("catsdogs", "benchmarks") or (first in MODULE_NAMES and first != "spark"):
            found.append(token.replace("/", "."))
    return found


def resolves(parts: list[str]) -> bool:
    """Whether the longest importable prefix of ``parts`` is a module that has the rest as attributes."""
    import importlib

    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for name in parts[k:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def name_problem(token: str) -> str:
    """'' when ``token`` names real code (importing the module, getattr of the rest), else why not."""
    parts = token.split(".")
    if parts[0] in ("catsdogs", "benchmarks"):
        candidates = [parts]
    else:  # a short form: catsdogs.<parts> or catsdogs.<package>.<parts>
        packages = sorted(p.parent.relative_to(SRC).as_posix().replace("/", ".")
                          for p in SRC.rglob("__init__.py") if p.parent != SRC)
        candidates = [["catsdogs", *parts], *(["catsdogs", *pkg.split("."), *parts] for pkg in packages)]
    if any(resolves(c) for c in candidates):
        return ""
    if len(parts) == 2 and parts[0] == "catsdogs":  # an MLflow tag: f"{TAG_PREFIX}name" in the code
        if any(re.search(rf"TAG_PREFIX\}}{re.escape(parts[1])}\b", p.read_text()) for p in SRC.rglob("*.py")):
            return ""
    return f"{token} does not resolve"


def test_every_code_name_in_the_docs_resolves() -> None:
    names = {(d.name, t) for d in TOP_DOCS for t in code_names(d.read_text())}
    assert len(names) > 25, f"found only {len(names)} code names: the extraction is broken"
    assert {t.split(".")[0] for _, t in names} >= {"catsdogs", "benchmarks"}
    assert any(t.split(".")[0] in MODULE_NAMES for _, t in names)  # short forms are checked too
    wrong = sorted(f"{doc}: {name_problem(t)}" for doc, t in names if name_problem(t))
    assert not wrong


def test_the_name_check_catches_rot() -> None:
    text = ("`catsdogs.models.ood.NOPE` `models.ood.OWN_SHARE` `guard.screened_check` `catsdogs.nope_tag` "
            "`catsdogs.training_run_id` `best.pt` `spark.task.cpus` `infer/prediction.Prediction` "
            "`benchmarks.open_world.held_out_clas`")
    names = code_names(text)
    assert "best.pt" not in names and "spark.task.cpus" not in names
    assert {t: bool(name_problem(t)) for t in names} == {
        "catsdogs.models.ood.NOPE": True, "models.ood.OWN_SHARE": False, "guard.screened_check": False,
        "catsdogs.nope_tag": True, "catsdogs.training_run_id": False, "infer.prediction.Prediction": False,
        "benchmarks.open_world.held_out_clas": True}


# ------------------------------------------------------------------------------- claims against the code

FROZEN_DISTRIBUTED = re.compile(r"`catsdogs train --freeze backbone --distributed N` runs the frozen feature "
                                r"pass as N Spark tasks on\s+`--master`; it is not refused\.")
REFUSED = re.compile(r"\b(refused|refuses|not supported|cannot)\b", re.I)


def test_freeze_backbone_distributed_is_the_feature_pass_on_spark_as_the_docs_say(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/cluster.md says that --freeze backbone --distributed N runs the feature pass on Spark; the code
    must route it there (not refuse it, not start DDP), and no doc may say that it is refused."""
    from catsdogs.config import TrainConfig
    from catsdogs.train import frozen, launch

    assert FROZEN_DISTRIBUTED.search((ROOT / "docs" / "cluster.md").read_text())
    for doc in TOP_DOCS:
        for sentence in re.split(r"(?<=[.!?])\s+", doc.read_text()):
            if "--distributed" in sentence and re.search(r"freeze backbone|frozen", sentence):
                assert not REFUSED.search(sentence.replace("is not refused", "")) or "shards" in sentence, \
                    f"{doc.name}: {sentence!r}"

    cfg = build_config(TrainConfig, {"data": str(tmp_path / "shards"), "output": str(tmp_path / "run"),
                                     "model": "effnet_lite0", "freeze": "backbone", "distributed": 2})
    assert frozen.on_spark(cfg)
    with pytest.raises(Exception, match="Spark tasks"):
        launch.plan_launch(cfg)  # the DDP launcher is not the way this combination runs
    seen: list[TrainConfig] = []

    def fake_frozen(c: TrainConfig, **_: object) -> dict[str, float]:
        seen.append(c)
        return {"val_loss": 0.1, "val_acc": 0.9, "C": 1.0, "feature_seconds": 0.0}

    def no_ddp(_: TrainConfig) -> None:
        raise AssertionError("--freeze backbone --distributed started DDP processes")

    monkeypatch.setattr(launch, "train_frozen", fake_frozen)
    monkeypatch.setattr(launch, "train_distributed", no_ddp)
    assert launch.main(cfg) == 0
    assert len(seen) == 1 and seen[0].distributed == 2 and frozen.on_spark(seen[0])


# ------------------------------------------------------------------------------- figures and fragments

FIGURE = re.compile(r"(\d[\d,]*(?:\.\d+)?)\s?(%|s\b)")
FRACTION = re.compile(r"(?<![\d.])0\.\d{3,4}(?![\d.])")


def figures(text: str) -> set[tuple[float, str]]:
    """The figures of a text as (value, unit); a fraction such as 0.9933 also counts as 99.33 %."""
    found = {(round(float(v.replace(",", "")), 4), unit) for v, unit in FIGURE.findall(text)}
    return found | {(round(float(f) * 100, 4), "%") for f in FRACTION.findall(text)}


def readme_results() -> list[tuple[str, list[str], list[Path]]]:
    """The README's results table as (what, the presets' cells, the fragments the row links)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines()
            if line.startswith("|") and not re.match(r"^\|[-|\s]+\|$", line)]
    out = []
    for line in rows[1:]:  # after the header
        what, *presets, links = [c.strip() for c in line.strip().strip("|").split("|")]
        out.append((what, presets, [ROOT / target for target in LINK.findall(links)]))
    return out


def test_the_readme_results_are_the_fragments_figures() -> None:
    rows = readme_results()
    assert len(rows) >= 5
    checked = 0
    for what, presets, fragments in rows:
        assert fragments, what
        assert all(f.parent == ROOT / "docs" / "benchmarks" and f.is_file() for f in fragments), what
        for i, cell in enumerate(presets):
            # One fragment per preset column when the row links one each, else any of them.
            sources = [fragments[i]] if len(fragments) == len(presets) else fragments
            known = set().union(*(figures(f.read_text()) for f in sources))
            for figure in figures(cell):
                assert figure in known, f"README {what!r}: {cell!r} is not in {[f.name for f in sources]}"
                checked += 1
    assert checked >= 15


def test_the_figure_check_catches_rot() -> None:
    assert figures("accuracy 0.9933, Wall: 140 s, 99.5 % and 1,800 photos") == {
        (99.33, "%"), (140.0, "s"), (99.5, "%")}
    stale = "**Wall: 140 s** (target <= 150 s: met); accuracy 0.9933"  # a fragment re-measured since
    assert (115.0, "s") not in figures(stale) and (140.0, "s") in figures(stale)


# ------------------------------------------------------------------------------- the docs as a whole


def test_the_benchmarks_index_is_up_to_date() -> None:
    from benchmarks.run_all import INDEX, index_text

    text = index_text()
    assert "missing from the fragment" not in text
    assert INDEX.read_text() == text, "run .venv/bin/python -m benchmarks.run_all --collect-only"


def test_the_docs_stay_short_and_speak_to_users() -> None:
    words = sum(len(d.read_text().split()) for d in (ROOT / "docs").glob("*.md"))
    assert words <= 15_000, f"docs/*.md hold {words} words"
    assert len((ROOT / "README.md").read_text().split()) <= 1_500
    internal = re.compile(r"issue [0-9]|the lead|/tmp/|shared/data", re.I)
    found = [(d.name, m.group(0)) for d in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
             for m in internal.finditer(d.read_text())]
    assert not found, "developer-only notes belong in CONTRIBUTING.md"


def test_every_benchmark_fragment_records_its_date_and_machine() -> None:
    undated = [f.name for f in sorted((ROOT / "docs" / "benchmarks").glob("*.md"))
               if not re.search(r"\b20\d\d-\d\d-\d\d\b", f.read_text())
               or not re.search(r"\bcores?\b", f.read_text(), re.I)]
    assert not undated, f"fragments without a date or a machine: {undated}"
