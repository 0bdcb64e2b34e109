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


# ---------------------------------------------------------------- the import graph of the library
# Layers, bottom to top: a module imports only from its own layer or lower ones (an import of a higher
# layer is an upward import). Within a layer, modules must not import each other in a circle.
LAYERS = (
    ("utils.recipe", "utils.cli", "utils.locks", "utils.distributed", "utils.data"),
    ("models",),
    ("utils.checkpoint", "utils.attacks"),
    ("utils.training",),
    ("utils.evaluation",),
    ("utils.analysis",),
    ("utils.reproduce",),
)
# imported inside a function on purpose: optional, heavy, or only needed on one path
OPTIONAL = {"torchvision", "pyautoattack", "autoattack", "umap", "robustbench"}


def _module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in LIBRARY}


def _layer(module):
    for level, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return level
    raise AssertionError(f"{module} belongs to no layer of tests/test_layering.py; add it to LAYERS")


def library_imports(path):
    """``(imported library module, inside a function?)`` for every import of ``path``."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against the package
                    package = _module_name(path).split(".")
                    package = package[:len(package) - child.level + (path.name == "__init__.py")]
                    base = ".".join([*package, base] if base else package)
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    found.append((full if full in MODULES else base, inner))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def test_library_imports_resolves_relative_imports_and_sees_functions(tmp_path):
    imports = library_imports(ROOT / "models" / "zoo.py")
    assert ("models.layouts", False) in imports and ("models.registry", False) in imports


def test_no_upward_imports():
    upward = sorted(f"{name} imports {dep}" for name, path in MODULES.items() for dep, _ in library_imports(path)
                    if dep in MODULES and _layer(dep) > _layer(name))
    assert upward == []


def test_no_import_inside_a_function_but_optional_dependencies():
    inner = sorted(f"{name}: {dep}" for name, path in MODULES.items() for dep, in_function in library_imports(path)
                   if in_function and dep.split(".")[0] not in OPTIONAL)
    assert inner == []


def test_no_import_cycles():
    graph = {name: {dep for dep, _ in library_imports(path) if dep in MODULES and dep != name}
             for name, path in MODULES.items()}
    cycles, state = [], {}

    def walk(node, trail):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(trail[trail.index(dep):] + [dep]))
            elif dep not in state:
                walk(dep, trail + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert cycles == []


# ---------------------------------------------------------------- the recipe's numbers live in one place
RECIPE_NUMBERS = {0.007, 0.001, 8 / 255}
RECIPE_TUPLES = {(0.5, 2.0, 8.0), (0.1, 1.0, 10.0)}
RECIPE_NAMES = {"eps", "step_size", "aux_weight", "joint_weights", "taus", "start_noise"}


def stray_recipe_literals(source):
    """Line numbers where code (not comments or docstrings) spells a recipe constant instead of naming
    ``utils.recipe``: ε as ``8/255``, the step 0.007, the start noise 0.001, the joint weights or τ
    tuples, or a number given to an ε/step/λ parameter or field."""
    lines = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and \
                [getattr(node.left, "value", None), getattr(node.right, "value", None)] == [8, 255]:
            lines.add(node.lineno)
        elif isinstance(node, ast.Constant) and type(node.value) is float and node.value in RECIPE_NUMBERS:
            lines.add(node.lineno)
        elif isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts) and \
                tuple(e.value for e in node.elts) in RECIPE_TUPLES:
            lines.add(node.lineno)
        elif isinstance(node, ast.arguments):
            named = node.posonlyargs + node.args
            pairs = list(zip(named[len(named) - len(node.defaults):], node.defaults)) + \
                [(a, d) for a, d in zip(node.kwonlyargs, node.kw_defaults) if d is not None]
            lines |= {d.lineno for a, d in pairs if a.arg in RECIPE_NAMES and isinstance(d, ast.Constant)
                      and type(d.value) is float and d.value > 0}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in RECIPE_NAMES \
                and isinstance(node.value, ast.Constant) and type(node.value.value) is float and node.value.value > 0:
            lines.add(node.lineno)
    return sorted(lines)


def test_stray_recipe_literals_finds_each_spelling():
    source = ("EPS = 8 / 255\nx = 0.007\ndef f(eps=0.03, aux_weight=0.0, *, step_size=0.01):\n    pass\n"
              "class S:\n    taus: tuple = (0.1, 1.0, 10.0)\n    aux_weight: float = 2.0\n# 8/255 in a comment\n")
    assert stray_recipe_literals(source) == [1, 2, 3, 6, 7]


def test_recipe_constants_are_written_only_in_utils_recipe():
    scripts = [p for p in ROOT.glob("*.py")]
    stray = {str(p.relative_to(ROOT)): stray_recipe_literals(p.read_text())
             for p in LIBRARY + scripts if p.name != "recipe.py"}
    assert {path: lines for path, lines in stray.items() if lines} == {}
