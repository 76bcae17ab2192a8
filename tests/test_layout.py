"""The kit's layering and its command lines: the package never imports or runs a script, and no
test imports one; no two modules import each other (at module or function level), every option of every command explains itself,
and a value outside an option's choices is refused when the config is parsed."""
import ast
import dataclasses
import functools
import importlib
import typing

import pytest

from tests.conftest import ROOT, run_script
from utils.config import parse_config
from utils.errors import ConfigError

SCRIPTS = ["train", "ensemble", "export", "infer", "augment", "tune", "fit", "demo"]


def module_name(path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


@functools.lru_cache(maxsize=None)
def parse(source: str) -> ast.Module:
    """A module's syntax tree, parsed once per text (the tests walk every file several times)."""
    return ast.parse(source)


def imports_of(path) -> set[str]:
    """Every kit module (script or utils.*) that ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in SCRIPTS or name.startswith("utils."):
                if (ROOT / (name.replace(".", "/") + ".py")).is_file() or name in SCRIPTS:
                    found.add(name)
                elif (ROOT / name.replace(".", "/") / "__init__.py").is_file():
                    found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = [ROOT / f"{s}.py" for s in SCRIPTS] + sorted((ROOT / "utils").rglob("*.py"))
    return {module_name(p): imports_of(p) - {module_name(p)} for p in files}


def test_the_package_never_imports_a_script():
    offenders = {m: sorted(i for i in deps if i in SCRIPTS) for m, deps in graph().items() if m.startswith("utils")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_the_tests_never_import_a_script():
    """What a test needs lives in the package; a script is only ever run as a command line."""
    offenders = {p.name: sorted(i for i in imports_of(p) if i.split(".")[0] in SCRIPTS)
                 for p in sorted((ROOT / "tests").glob("*.py"))}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_the_import_check_sees_a_test_importing_a_script(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text("import export\nfrom tune import TuneConfig\nfrom utils.serve import budget\n")
    assert sorted(i for i in imports_of(bad) if i.split(".")[0] in SCRIPTS) == ["export", "tune"]


def script_runs(path) -> list[str]:
    """How ``path`` would run a kit script at run time: importing runpy, or an argv (a list or tuple
    literal) holding a script's file name, as subprocess or multiprocessing would be given."""
    found, files = [], {f"{s}.py" for s in SCRIPTS}
    for node in ast.walk(parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name == "runpy" for a in node.names) or \
                isinstance(node, ast.ImportFrom) and node.module == "runpy":
            found.append(f"line {node.lineno}: imports runpy")
        if isinstance(node, (ast.List, ast.Tuple)):
            named = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in files]
            found += [f"line {node.lineno}: an argv running {n}" for n in named]
    return found


def test_the_package_never_runs_a_script():
    """The library is driven by the scripts, never the other way: no module of utils/ runs one at
    run time (the demo runner is demo.py; a benchmark of a script takes the user's command)."""
    offenders = {module_name(p): script_runs(p) for p in sorted((ROOT / "utils").rglob("*.py"))}
    assert {m: f for m, f in offenders.items() if f} == {}


def test_the_run_time_check_sees_what_it_forbids(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('import runpy\nimport subprocess, sys\nsubprocess.run([sys.executable, "train.py", "--fold", "0"])\n'
                   'cmd = [sys.executable, "infer.py"]\n')
    assert sorted(script_runs(bad)) == ["line 1: imports runpy", "line 3: an argv running train.py",
                                "line 4: an argv running infer.py"]
    good = tmp_path / "good.py"
    good.write_text('"""Runs like python train.py --fold 0."""\nargs = ["-m", "utils.bench.models", "--one"]\n')
    assert script_runs(good) == []


def test_no_import_cycle():
    g = graph()

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in g.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(m for m in g if m in reach(m))
    assert cycles == []


# the pipeline's stages, in the order data flows through them (fit, last, plans and drives the others);
# shared modules sit at utils/'s top
STAGES = ["data", "train", "ensemble", "serve", "fit"]
OUTSIDE = ["tools", "bench"]  # generators, command-line tools and benchmarks: users of the stages, never used by them


def layer(module: str) -> tuple[str, int]:
    """("stage", its position), ("outside", 99) for a tool or benchmark, else ("shared", -1)."""
    part = module.split(".")[1] if module.startswith("utils.") else ""
    if part in STAGES:
        return "stage", STAGES.index(part)
    return ("outside", 99) if part in OUTSIDE else ("shared", -1)


def layering_offences(g: dict[str, set[str]]) -> list[str]:
    """A stage imports only earlier stages and the shared modules; a shared module imports only
    shared modules and the first stage (the layout's contract: schema, folds); nothing in a stage
    or shared imports a tool or a benchmark."""
    found = []
    for module, deps in g.items():
        if not module.startswith("utils."):
            continue
        kind, level = layer(module)
        for dep in sorted(deps):
            dep_kind, dep_level = layer(dep)
            if kind == "outside" or dep_kind == "shared":
                continue
            if dep_kind == "outside":
                found.append(f"{module} imports {dep}, a tool")
            elif kind == "shared" and dep_level > 0:
                found.append(f"{module} (shared) imports {dep}, a later stage than data")
            elif kind == "stage" and dep_level > level:
                found.append(f"{module} ({STAGES[level]}) imports {dep} ({STAGES[dep_level]}), a later stage")
    return found


def test_a_stage_imports_only_earlier_stages_and_shared_modules():
    """Whoever edits a stage breaks only the stages after it: data -> train -> ensemble -> serve,
    each importing only what comes before it and the shared modules at utils/'s top (config,
    errors, io, provenance, plots, run, metric, blend); tools and benchmarks are used, never users."""
    folders = {p.name for p in (ROOT / "utils").iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(STAGES + OUTSIDE)
    assert layering_offences(graph()) == []


def test_the_layering_check_sees_each_kind_of_offence():
    g = {"utils.data.dataset": {"utils.train.model", "utils.io"}, "utils.train.fold": {"utils.metric", "utils.data.schema"},
         "utils.serve.infer": {"utils.tools.baseline", "utils.ensemble.search"}, "utils.run": {"utils.ensemble.search"},
         "utils.tools.baseline": {"utils.serve.submission"}, "utils.metric": {"utils.data.schema"}}
    assert sorted(layering_offences(g)) == [
        "utils.data.dataset (data) imports utils.train.model (train), a later stage",
        "utils.run (shared) imports utils.ensemble.search, a later stage than data",
        "utils.serve.infer imports utils.tools.baseline, a tool"]


def config_classes():
    """(command, config dataclass) of every command line of the kit: the class each script or
    ``python -m`` module hands to ``run_command``."""
    found = []
    files = [ROOT / f"{s}.py" for s in SCRIPTS] + sorted((ROOT / "utils").rglob("*.py"))
    for path in files:
        for node in ast.walk(parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "run_command":
                module = importlib.import_module(module_name(path))
                found.append((module.__name__, getattr(module, node.args[1].id)))
    return found


def test_every_option_of_every_command_has_help_and_valid_choices():
    classes = config_classes()
    assert {m for m, _ in classes} >= {*SCRIPTS, "utils.tools.baseline", "utils.metric", "utils.tools.demo_data",
                                       "utils.tools.compare_runs", "utils.bench.train", "utils.bench.memory",
                                       "utils.bench.ensemble", "utils.bench.latency"}
    for module, cls in classes:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{module}.{cls.__name__}.{f.name} has no help text"
        defaults = cls()
        for f in dataclasses.fields(cls):
            choices, value = f.metadata.get("choices"), getattr(defaults, f.name)
            if choices and value is not None:
                assert all(v in choices for v in (value if isinstance(value, list) else [value])), f.name


@pytest.mark.parametrize("script", ["train.py", "ensemble.py", "export.py", "infer.py"])
def test_help_lists_every_option_with_its_text(script):
    out = run_script(script, "--help").stdout
    module = importlib.import_module(script[:-3])
    cls = next(c for s, c in config_classes() if s == script[:-3])
    for f in dataclasses.fields(cls):
        assert f"--{f.name.replace('_', '-')}" in out
        words = f.metadata["help"].split()[:3]
        assert " ".join(words) in " ".join(out.split()), (f.name, words)
    assert module.__doc__.splitlines()[0] in out


@pytest.mark.parametrize("script, key, value", [
    ("train.py", "loss", "cross_entropy"), ("ensemble.py", "bias", "onn"), ("ensemble.py", "compare", "equal,sot"),
    ("export.py", "threads", "two"), ("infer.py", "backend", "tensorrt"),
])
def test_a_wrong_value_is_refused_at_parse_time_naming_key_value_and_choices(script, key, value):
    cls = next(c for s, c in config_classes() if s == script[:-3])
    with pytest.raises(ConfigError) as err:
        parse_config(cls, [f"--{key.replace('_', '-')}", value])
    message = str(err.value)
    assert f"key '{key}'" in message and "command line" in message
    choices = dataclasses.fields(cls)[[f.name for f in dataclasses.fields(cls)].index(key)].metadata["choices"]
    if choices:
        assert all(c in message for c in choices) and repr(value.split(",")[-1]) in message
    proc = run_script(script, f"--{key.replace('_', '-')}", value, check=False)  # before any work starts
    assert proc.returncode == 2 and f"error: command line: key '{key}'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_bare_boolean_flag_means_true():
    from utils.train.config import TrainConfig

    cfg = parse_config(TrainConfig, ["--resume", "--fold", "all", "--progress", "false"])
    assert cfg.resume is True and cfg.progress is False and cfg.fold == "all"
    hints = typing.get_type_hints(TrainConfig)
    assert hints["resume"] is bool
