"""The layout's rules, read from the source: only segjob/cluster/ imports Ray, and no module imports a command."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "segjob"
COMMANDS = {"train", "tune", "check", "pull", "evaluate", "predict", "report"}
TOP_LEVEL = COMMANDS | {"__init__", "errors"}
LAYERS = {"job", "data", "models", "learning", "engine", "store", "cluster", "results"}


def modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, function-level ones and importlib.import_module("…") too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module_name(path).split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((node.lineno, str(node.args[0].value)))
    return found


def test_only_the_cluster_package_imports_ray():
    outside = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
               for path in modules() if "cluster" not in path.relative_to(PACKAGE).parts[:1]
               for line, module in imported(path) if module == "ray" or module.startswith("ray.")]
    assert not outside, "only segjob/cluster/ may import Ray:\n" + "\n".join(outside)


def test_no_module_imports_a_command():
    commands = {f"segjob.{command}" for command in COMMANDS}
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
                 for path in modules() for line, module in imported(path) if module in commands]
    assert not offenders, "what two commands share belongs in the library:\n" + "\n".join(offenders)


def test_the_top_holds_the_commands_and_the_rest_sits_in_its_layer():
    top = {path.stem for path in PACKAGE.glob("*.py")}
    folders = {path.name for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert top == TOP_LEVEL and folders == LAYERS


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_opens_with_its_invocation_and_ends_with_main(command):
    source = (PACKAGE / f"{command}.py").read_text()
    assert f"python -m segjob.{command}" in ast.get_docstring(ast.parse(source))
    assert source.rstrip().endswith('if __name__ == "__main__":\n    raise SystemExit(main())')
