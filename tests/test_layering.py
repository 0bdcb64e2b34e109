"""The library never imports a top-level script: scripts are entry points that parse arguments and
call the library (utils/, models/), so a script can change without breaking library code."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {p.stem for p in ROOT.glob("*.py")}
LIBRARY = [p for folder in ("models", "utils") for p in sorted((ROOT / folder).rglob("*.py"))]


def imported_modules(source):
    """Top-level names of every module a Python source imports (at any depth of the file)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imported_modules_sees_imports_inside_functions():
    source = "import os.path\nfrom utils import data\ndef f():\n    from test_white_attack import main\n"
    assert imported_modules(source) == {"os", "utils", "test_white_attack"}


def test_there_are_scripts_and_library_modules():
    assert {"test_white_attack", "reproduce", "train_CIFAR10_ResNet"} <= SCRIPTS
    assert len(LIBRARY) > 40


def test_no_library_module_imports_a_script():
    offenders = {str(p.relative_to(ROOT)): sorted(imported_modules(p.read_text()) & SCRIPTS) for p in LIBRARY}
    assert {path: names for path, names in offenders.items() if names} == {}
