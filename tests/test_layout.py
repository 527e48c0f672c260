"""The package's architecture, checked: no import cycle, a lazy top-level import, and a README that lists the tree."""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import higgs_trainer

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "higgs_trainer"


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package: Path) -> dict[str, Path]:
    return {module_name(path, package): path for path in sorted(package.rglob("*.py"))}


def _under_type_checking(tree: ast.Module) -> set[int]:
    """Ids of the import nodes inside ``if TYPE_CHECKING:`` blocks (never run)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for child in node.body for inner in ast.walk(child))
    return skipped


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of the package -> the package modules it imports, at module level or inside a function."""
    modules = package_modules(package)
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        skipped = _under_type_checking(tree)
        here = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                # `from package import module` imports that module; `from module import name` the module alone
                targets = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
                targets = targets or [base]
            else:
                continue
            edges.update(target for target in targets if target in modules and target != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert graph["higgs_trainer.merge.merging"] >= {"higgs_trainer.merge.streaming", "higgs_trainer.merge.in_memory"}
    assert graph["higgs_trainer.cli.main"] >= {"higgs_trainer.errors"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_function_level_cycle():
    """The check itself: a cycle closed only by an import inside a function is still one."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_an_import_inside_a_function_is_an_edge(tmp_path):
    package = tmp_path / "higgs_trainer"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "one.py").write_text("from . import two\n")
    (package / "sub" / "two.py").write_text("def f():\n    from ..sub.one import f\n")
    graph = import_graph(package)
    assert graph["higgs_trainer.sub.two"] == {"higgs_trainer.sub.one"}
    assert find_cycle(graph) == ["higgs_trainer.sub.one", "higgs_trainer.sub.two", "higgs_trainer.sub.one"]


HEAVY = ("torch", "transformers", "peft", "accelerate", "safetensors")


@pytest.mark.parametrize(
    "argv", [["--help"], ["--version"], ["merge", "--help"], ["verify"]], ids=["help", "version", "merge-help", "usage"]
)
def test_help_and_version_import_neither_torch_nor_transformers(argv):
    code = (
        "import sys; from higgs_trainer.cli import main; status = main(sys.argv[1:]); "
        f"print([m for m in {HEAVY!r} if m in sys.modules], status, file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT)
    loaded, status = result.stderr.strip().splitlines()[-1].rsplit(" ", 1)
    assert loaded == "[]", f"higgs-trainer {' '.join(argv)} imported {loaded}"
    assert int(status) == (2 if argv == ["verify"] else 0)
    assert result.stdout if argv != ["verify"] else not result.stdout


def test_importing_the_package_imports_nothing_heavy():
    code = f"import sys, higgs_trainer; print([m for m in {HEAVY!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]"


def test_every_public_name_is_importable_from_the_package():
    table = higgs_trainer._PUBLIC_NAMES
    assert sorted(higgs_trainer.__all__) == sorted(table) == higgs_trainer.__all__
    for name, module in table.items():
        assert getattr(higgs_trainer, name) is getattr(importlib.import_module(f"higgs_trainer.{module}"), name)
        assert name in dir(higgs_trainer)
    with pytest.raises(AttributeError, match="has no attribute 'merge_adapters'"):
        higgs_trainer.merge_adapters  # noqa: B018


def readme_tree() -> list[str]:
    """The paths the README's Layout section lists, in its order, from its ``higgs_trainer/`` tree block."""
    layout = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", (ROOT / "README.md").read_text(), re.M | re.S).group(1)
    block = re.search(r"```text\n(higgs_trainer/\n.*?)```", layout, re.S).group(1)
    paths, stack = [], []
    for line in block.splitlines():
        entry = line.split()[0]
        depth = (len(line) - len(line.lstrip())) // 4
        stack = stack[:depth] + [entry]
        paths.append("".join(stack))
    return paths


def test_the_readme_layout_lists_the_package_as_it_is():
    listed = readme_tree()
    actual = sorted(
        f"{path.relative_to(ROOT).as_posix()}{'/' if path.is_dir() else ''}"
        for path in PACKAGE.rglob("*")
        if "__pycache__" not in path.parts and (path.is_dir() or path.suffix == ".py")
    )
    assert sorted(listed) == sorted(["higgs_trainer/", *actual])
