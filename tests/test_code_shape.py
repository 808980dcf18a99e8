"""The code stays readable: no function or method in the library or its entry points is longer
than ~80 lines, and the README's layout table names every module of the library."""

import ast
import re

from conftest import PROJECT_ROOT

MAX_FUNCTION_LINES = 80
PACKAGES = ("glide_jax", "sample", "train")


def _long_functions():
    for package in PACKAGES:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        yield f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} {node.name} ({length} lines)"


def test_no_function_is_longer_than_80_lines():
    assert list(_long_functions()) == []


def test_readme_layout_names_every_library_module():
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):]
    named = set(re.findall(r"`(?:glide_jax/)?(\w+)\.py`", layout))
    modules = {p.stem for p in (PROJECT_ROOT / "glide_jax").glob("*.py") if p.stem != "__init__"}
    assert modules - named == set(), f"modules missing from the README's layout table: {modules - named}"
    assert named <= modules, f"the layout names modules that do not exist: {named - modules}"
