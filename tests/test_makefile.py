"""The newcomer's two commands (`make demo`, `make test`) and CI's use of them.

The Makefile runs for real against a fake interpreter that records its calls, so venv creation,
installs, stamps and exit codes are checked without a network; `make -n` checks the real
project's dry runs; `.ci/run` runs against a fake `make`.
"""
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ("requirements.txt", "requirements-dev.txt")
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

FAKE_PYTHON = """#!/usr/bin/env bash
# Records each call; `-m venv DIR` makes DIR/bin/python (this script) and DIR/bin/ruff.
echo "python $*" >> "$FAKE_LOG"
if [ "$1" = -m ] && [ "$2" = venv ]; then
  mkdir -p "$3/bin" && ln -s "{me}" "$3/bin/python" && ln -s "{ruff}" "$3/bin/ruff"
fi
if [ "$1" = -m ] && [ "$2" = pytest ]; then exit "${{FAKE_PYTEST_STATUS:-0}}"; fi
exit 0
"""
FAKE_RUFF = '#!/usr/bin/env bash\necho "ruff $*" >> "$FAKE_LOG"\n'
FAKE_MAKE = """#!/usr/bin/env bash
echo "make $* VENV=${VENV:-} CI=$CI" >> "$FAKE_LOG"
[ "$1" != "${FAKE_FAIL_TARGET:-none}" ] || exit 2
"""


def _script(path, text):
    """Write an executable script."""
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def project(tmp_path):
    """A copy of the Makefile and requirement files, a fake python3 and a log of its calls."""
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("Makefile", *REQUIREMENTS):
        shutil.copy(ROOT / name, proj / name)
    ruff = _script(tmp_path / "fake_ruff", FAKE_RUFF)
    me = tmp_path / "fake_python"
    _script(me, FAKE_PYTHON.format(me=me, ruff=ruff))
    return proj, me, tmp_path / "calls.log"


def _make(project, *args, pytest_status=0):
    """Run make in the copied project with the fake interpreter; returns (process, calls logged)."""
    proj, python, log = project
    log.write_text("")
    env = dict(os.environ, FAKE_LOG=str(log), FAKE_PYTEST_STATUS=str(pytest_status))
    env.pop("TORCH", None)
    done = subprocess.run(["make", "--no-print-directory", "-C", str(proj), f"PYTHON={python}", "VENV=venv", *args],
                          capture_output=True, text=True, env=env, timeout=60)
    return done, log.read_text().splitlines()


def _torch_pins():
    """The torch / torchvision lines of requirements.txt."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if re.match(r"(torch|torchvision)[<>=!~ ]", line)]


def test_make_test_creates_the_venv_installs_dev_requirements_and_runs_pytest(project):
    done, calls = _make(project, "test")
    assert done.returncode == 0, done.stderr
    assert calls == ["python -m venv venv", "python -m pip install --quiet --upgrade pip",
                     "python -m pip install --quiet -r requirements-dev.txt", "python -m pytest -q"]


def test_a_second_run_does_not_reinstall_until_a_requirement_file_changes(project):
    assert _make(project, "test")[0].returncode == 0
    done, calls = _make(project, "test")
    assert done.returncode == 0 and calls == ["python -m pytest -q"]
    later = time.time() + 5
    os.utime(project[0] / "requirements.txt", (later, later))
    done, calls = _make(project, "test")
    assert calls == ["python -m pip install --quiet -r requirements-dev.txt", "python -m pytest -q"]


def test_make_demo_installs_run_requirements_and_runs_the_smoke_training(project):
    done, calls = _make(project, "demo")
    assert done.returncode == 0, done.stderr
    assert calls[0] == "python -m venv venv"
    assert calls[2:] == ["python -m pip install --quiet -r requirements.txt", "python train_CIFAR10_ResNet.py --smoke"]


def test_test_fast_deselects_slow_tests_and_lint_runs_ruff(project):
    _, calls = _make(project, "test-fast")
    assert calls[-1] == "python -m pytest -q -m not slow"
    _, calls = _make(project, "lint")
    assert calls == ["ruff check ."]


def test_torch_cpu_installs_torch_from_the_cpu_index_first(project):
    done, calls = _make(project, "test", "TORCH=cpu")
    assert done.returncode == 0, done.stderr
    pins = _torch_pins()
    assert len(pins) == 2
    cpu = "python -m pip install --quiet --index-url https://download.pytorch.org/whl/cpu " + " ".join(pins)
    assert calls.index(cpu) < calls.index("python -m pip install --quiet -r requirements-dev.txt")


def test_switching_torch_flavour_in_one_venv_is_refused(project):
    assert _make(project, "test", "TORCH=cpu")[0].returncode == 0
    done, calls = _make(project, "test", "TORCH=cuda")
    assert done.returncode != 0 and calls == []
    assert "error: venv was installed with the other TORCH setting" in done.stderr


def test_unknown_torch_value_is_refused_before_anything_runs(project):
    done, calls = _make(project, "demo", "TORCH=gpu")
    assert done.returncode == 2 and calls == []
    assert "TORCH must be cpu or cuda" in done.stderr


def test_pytest_collecting_nothing_fails_with_one_sentence(project):
    done, _ = _make(project, "test", pytest_status=5)
    assert done.returncode != 0
    assert "error: pytest collected no tests" in done.stderr
    done, _ = _make(project, "test", pytest_status=1)
    assert done.returncode != 0 and "collected no tests" not in done.stderr


def _dry_run(target, venv):
    """`make -n TARGET` in the real project."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH", "PYTHON", "VENV")}
    done = subprocess.run(["make", "--no-print-directory", "-n", "-C", str(ROOT), target, f"VENV={venv}"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_dry_runs_show_venv_creation_when_missing(tmp_path):
    venv = tmp_path / "missing"
    demo = _dry_run("demo", venv)
    assert f"python3 -m venv {venv}" in demo
    assert f"{venv}/bin/python -m pip install --quiet -r requirements.txt" in demo
    assert demo.rstrip().endswith(f"{venv}/bin/python train_CIFAR10_ResNet.py --smoke")
    test = _dry_run("test", venv)
    assert f"python3 -m venv {venv}" in test
    assert f"{venv}/bin/python -m pip install --quiet -r requirements-dev.txt" in test
    assert f"{venv}/bin/python -m pytest -q" in test


def test_dry_run_with_an_installed_venv_only_runs_pytest(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    for stamp in (".ancra-torch-cuda", ".ancra-requirements-dev"):
        (venv / stamp).touch()
    lines = _dry_run("test", venv).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{venv}/bin/python -m pytest -q")


def _ci_copy(tmp_path):
    """A project folder holding a copy of .ci/run, a stale .ci-venv and a fake make on PATH."""
    proj = tmp_path / "proj"
    (proj / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", proj / ".ci" / "run")
    (proj / ".ci-venv").mkdir()
    (proj / ".ci-venv" / "old").touch()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "make", FAKE_MAKE)
    return proj, bin_dir


def _ci_run(tmp_path, *args, fail_target="none"):
    """Run the copied .ci/run; returns (process, fake-make calls, project folder)."""
    proj, bin_dir = _ci_copy(tmp_path)
    log = tmp_path / "make.log"
    log.write_text("")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log),
               FAKE_FAIL_TARGET=fail_target)
    env.pop("CI", None)
    done = subprocess.run(["bash", str(proj / ".ci" / "run"), *args], capture_output=True, text=True,
                          env=env, timeout=60)
    return done, log.read_text().splitlines(), proj


def test_ci_runs_make_lint_then_make_test_in_a_fresh_venv_with_ci_true(tmp_path):
    done, calls, proj = _ci_run(tmp_path)
    assert done.returncode == 0, done.stderr
    assert calls == ["make lint VENV=.ci-venv CI=true", "make test VENV=.ci-venv CI=true"]
    assert not (proj / ".ci-venv").exists()


def test_ci_stops_on_lint_findings_and_fails_on_test_failures(tmp_path):
    done, calls, _ = _ci_run(tmp_path / "a", fail_target="lint")
    assert done.returncode != 0 and calls == ["make lint VENV=.ci-venv CI=true"]
    done, calls, _ = _ci_run(tmp_path / "b", fail_target="test")
    assert done.returncode != 0 and len(calls) == 2


def test_ci_refuses_arguments(tmp_path):
    done, calls, _ = _ci_run(tmp_path, "-k", "x")
    assert done.returncode == 2 and calls == []
    assert done.stderr.startswith("error: ")


def test_readme_quick_start_shows_exactly_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command_as_written():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"```bash\n(.*?)```", readme.split("\n## Quick start\n", 1)[1], re.S).group(1)
    test_command = next(line.split("#", 1)[0].strip() for line in shown.splitlines() if "test" in line)
    assert test_command in ci_lines
