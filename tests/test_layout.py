"""The package's shape, checked: who may import whom, no private names across modules, small modules, a CLI start
that imports no torch, and a wheel that carries the shipped search spaces.

The import rules are read from the source with ``ast`` (no module is imported), so a violation names the file and
line. docs/design.md says why each rule exists.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "allconv_cli"
MAX_LINES = 450
HEAVY = ("torch", "optuna", "mlflow", "timm", "torchvision", "matplotlib")

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted (allconv_cli.search.worker)
    target: str  # the imported module, dotted; for `from a import b` this is `a.b` when b is a module, else `a`
    names: tuple[str, ...]  # the names of a `from` import, () for `import x`
    line: int
    top_level: bool  # executed when the module is imported (not inside a function)
    path: str  # relative to the repository

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str) -> bool:
    relative = Path(*dotted.split("."))
    return (ROOT / relative).with_suffix(".py").is_file() or (ROOT / relative / "__init__.py").is_file()


def _function_bodies(tree: ast.AST) -> set[int]:
    """ids of every node inside a function (their imports run only when the function is called)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(child) for child in ast.walk(node) if child is not node)
    return inside


def imports_of(path: Path) -> list[Import]:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function = _function_bodies(tree)
    rel = str(path.relative_to(ROOT))
    found = []
    for node in ast.walk(tree):
        top = id(node) not in in_function
        if isinstance(node, ast.Import):
            found += [Import(name, alias.name, (), node.lineno, top, rel) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = tuple(alias.name for alias in node.names)
            found.append(Import(name, base, names, node.lineno, top, rel))
            found += [Import(name, f"{base}.{n}", (), node.lineno, top, rel) for n in names if is_module(f"{base}.{n}")]
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))
IMPORTS = [imp for path in SOURCES for imp in imports_of(path)]


def within(dotted: str, *prefixes: str) -> bool:
    return any(dotted == p or dotted.startswith(p + ".") for p in prefixes)


def offenders(importer: str, forbidden: tuple[str, ...], top_level_only: bool = False) -> list[str]:
    """Imports of ``forbidden`` modules (or their submodules) by ``importer`` (a module, or a package and its own)."""
    return [f"{imp.where()} imports {imp.target}" for imp in IMPORTS
            if within(imp.module, importer) and within(imp.target, *forbidden)
            and (imp.top_level or not top_level_only)]


def test_the_rules_see_the_package() -> None:
    """Guard against a vacuous pass: the parser finds the imports the package is known to have."""
    assert len(SOURCES) > 20
    targets = {(imp.module, imp.target) for imp in IMPORTS}
    assert ("allconv_cli.cli.spaces_cmd", "allconv_cli.cli") in targets
    assert ("allconv_cli.spaces", "allconv_cli.space_files") in targets
    assert any(imp.module == "allconv_cli.engine" and imp.target == "torch" and imp.top_level for imp in IMPORTS)


def test_only_the_cli_imports_the_cli() -> None:
    """The library is usable without click; ``python -m allconv_cli`` (``__main__``) is the CLI's other door."""
    entry_points = ("allconv_cli.cli", "allconv_cli.__main__")
    bad = [f"{imp.where()} imports {imp.target}" for imp in IMPORTS
           if within(imp.target, "allconv_cli.cli") and not within(imp.module, *entry_points)]
    assert not bad


def test_engine_knows_nothing_of_tracking_search_or_the_cli() -> None:
    forbidden = ("allconv_cli.tracking", "allconv_cli.tracking.run", "allconv_cli.search", "allconv_cli.cli",
                 "mlflow", "optuna")
    assert not offenders("allconv_cli.engine", forbidden)


def test_models_know_nothing_of_data() -> None:
    assert not offenders("allconv_cli.models", ("allconv_cli.data",))


def test_report_imports_no_cli_and_no_torch_at_module_level() -> None:
    assert not offenders("allconv_cli.report", ("allconv_cli.cli",))
    assert not offenders("allconv_cli.report", ("torch", "torchvision", "timm"), top_level_only=True)


def test_report_loads_without_torch() -> None:
    """Reading MLflow and rendering a table needs no torch: ``allconv report`` starts fast on a laptop."""
    torch_stack = ("torch", "torchvision", "timm")
    code = f"import sys, allconv_cli.report; print([m for m in {torch_stack!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", f"import allconv_cli.report loaded {out.stdout.strip()}"


def test_no_private_name_is_imported_across_modules() -> None:
    """``from allconv_cli.x import _y`` (or ``x._y``) reaches into another module's internals."""
    bad = []
    for path in SOURCES:
        name = module_name(path)
        for imp in imports_of(path):
            if not within(imp.target, "allconv_cli") or imp.target == name:
                continue
            for n in imp.names:
                private_module = is_module(f"{imp.target}.{n}") and imp.target == name.rpartition(".")[0]
                if n.startswith("_") and not n.startswith("__") and not private_module:
                    bad.append(f"{imp.where()} imports {n} from {imp.target}")
        tree = ast.parse(path.read_text())
        aliases = _module_aliases(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and aliases.get(node.value.id, name) != name):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def _module_aliases(tree: ast.AST) -> dict[str, str]:
    """Local names bound to allconv modules: ``from allconv_cli import search`` -> {"search": "allconv_cli.search"}."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and within(node.module, "allconv_cli"):
            for alias in node.names:
                if is_module(f"{node.module}.{alias.name}"):
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if within(alias.name, "allconv_cli") and alias.asname:
                    aliases[alias.asname] = alias.name
    return aliases


def test_no_module_is_over_the_size_limit() -> None:
    """One concern per module; the design prose lives in docs/design.md, not in module docstrings."""
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in SOURCES}
    over = sorted(((n, f) for f, n in sizes.items() if n > MAX_LINES), reverse=True)
    assert not over, f"modules over {MAX_LINES} lines: " + ", ".join(f"{f} ({n})" for n, f in over)


HELP_PROBE = """
import json, sys
from allconv_cli.cli import main
for args in ([], *([name] for name in sorted(main.commands))):
    try:
        main([*args, "--help"], prog_name="allconv")
    except SystemExit as exc:
        assert exc.code == 0, (args, exc.code)
print(json.dumps({"commands": sorted(main.commands), "loaded": [m for m in %r if m in sys.modules]}))
"""


def test_help_of_every_command_imports_no_torch_optuna_or_mlflow() -> None:
    """``allconv --help`` and ``allconv COMMAND --help`` stay instant: the heavy libraries load inside commands."""
    out = subprocess.run([sys.executable, "-c", HELP_PROBE % (HEAVY,)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"train", "search", "spaces", "report"} <= set(probe["commands"])
    assert probe["loaded"] == [], f"--help imported {probe['loaded']}"


def test_wheel_ships_the_search_spaces(tmp_path: Path) -> None:
    """The shipped spaces are package data; a wheel without them would fail at the first `--space default`."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "allconv_cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "search_spaces", src / "search_spaces", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("allconv-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"allconv_cli/search_spaces/{p.name}" for p in (ROOT / "search_spaces").glob("*.yaml")}
    assert len(shipped) >= 4 and shipped <= names, sorted(shipped - names)
    assert {"allconv_cli/cli/__init__.py", "allconv_cli/space_files.py"} <= names
    packages = {str(p.parent.relative_to(ROOT)) for p in PACKAGE.rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= names, "pyproject.toml lists every package"
    assert not [n for n in names if n.startswith(("tests/", "scripts/", "benchmarks/"))]



class _Item:
    """Just what the marker rule reads of a collected test."""

    def __init__(self, name: str, marks: set[str], fixtures: tuple[str, ...] = ()) -> None:
        self.nodeid, self.marks, self.fixturenames = f"tests/test_x.py::{name}", marks, fixtures

    def get_closest_marker(self, name: str) -> str | None:
        return name if name in self.marks else None


def test_every_test_must_say_what_it_needs() -> None:
    """The rule in conftest.py that keeps `make test-fast` honest: no unmarked test, no unit test that needs more."""
    import conftest

    good = [_Item("test_a", {"unit"}), _Item("test_b", {"cifar"}, ("cifar10k", "tmp_path")),
            _Item("test_c", {"services", "slow"}, ("postgres",)), _Item("test_d", {"e2e"})]
    conftest.pytest_collection_modifyitems(None, good)  # accepted: no error
    for bad in (_Item("test_none", set()), _Item("test_unit_and_cifar", {"unit", "cifar"}),
                _Item("test_unit_with_data", {"unit"}, ("cifar10k",)),
                _Item("test_e2e_with_server", {"e2e"}, ("mlflow_server",))):
        with pytest.raises(pytest.UsageError, match=bad.nodeid):
            conftest.pytest_collection_modifyitems(None, [*good, bad])
