"""The suite does not depend on the name ``tests`` being importable: robustbench (the optional
extra) installs a top-level ``tests`` package into site-packages, which would shadow this folder
for every ``from tests.x import ...``. Test files share helpers by module name instead
(``from toys import ToyRA``, ``from conftest import build_model``); pyproject.toml puts tests/ on
the path."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# files that import helpers from their siblings (toys, conftest, other test modules)
SHARING = ("test_cascade.py", "test_eval_trust.py", "test_eval_benchmark.py", "test_features.py")


def test_no_test_file_imports_through_the_tests_package():
    offenders = [f"{path.name}: {line.strip()}" for path in sorted((ROOT / "tests").glob("*.py"))
                 for line in path.read_text().splitlines()
                 if line.startswith(("from tests.", "import tests.", "from tests import"))]
    assert offenders == []


def test_a_foreign_top_level_tests_package_does_not_break_collection(tmp_path):
    foreign = tmp_path / "tests"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("FOREIGN = True\n")  # a regular package wins over a namespace folder
    (foreign / "toys.py").write_text("raise ImportError('the foreign tests package was imported')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1")
    shadowed = subprocess.run([sys.executable, "-c", "import tests; print(tests.FOREIGN)"], cwd=ROOT, env=env,
                              capture_output=True, text=True)
    assert shadowed.stdout.strip() == "True"  # the simulation really shadows the folder
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *(f"tests/{name}" for name in SHARING)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error" not in done.stdout.lower().split("\n")[-2], done.stdout[-2000:]
