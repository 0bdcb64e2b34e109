"""Documentation that stays true: the protocol page's sections exist where code and README cite
them, README links resolve, and README's smoke sizes and run paths match the code."""
import os
import re
import subprocess
from pathlib import Path

import pytest

from utils import data
from utils.training import cli

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "docs" / "protocol.md"
README = ROOT / "README.md"
SECTIONS = {1: "Models", 2: "Attacks", 3: "Negatives", 4: "Losses", 5: "Training recipe", 6: "Feature analysis",
            7: "The paper's reported numbers", 8: "Adaptive evaluation"}
SKIP_DIRS = {".git", ".venv", ".ci-venv", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", "data"}
INTERNAL_NOTES = re.compile(r"S[P]EC")  # the former internal notes' name, spelled so this file does not match
CITATION = re.compile(r"docs/protocol\.md §(\d+)(?:[–-](\d+))?((?:, ?§\d+)*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _project_files(*suffixes):
    """Files of the project (tracked by git when it is a checkout), optionally by suffix."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30)
        paths = [ROOT / p for p in listed.stdout.decode().split("\0") if p]
    except (OSError, subprocess.SubprocessError):  # not a git checkout: walk it, skipping generated folders
        paths = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
            paths.extend(Path(folder) / f for f in files)
    return [p for p in paths if p.is_file() and (not suffixes or p.suffix in suffixes)]


def github_slug(heading):
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces → '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(markdown_file):
    """Anchors of every heading of a Markdown file."""
    return {github_slug(h) for h in re.findall(r"^#+ (.+)$", markdown_file.read_text(), re.M)}


def _section(markdown, heading):
    """Text of the section under ``heading`` (a full heading line), up to the next heading."""
    return re.split(r"\n#{1,6} ", markdown.split(f"\n{heading}\n", 1)[1], maxsplit=1)[0]


def test_github_slug_matches_githubs_rule():
    assert github_slug("§7 The paper's reported numbers") == "7-the-papers-reported-numbers"
    assert github_slug("Evaluating robustness (`test_white_attack.py`)") == "evaluating-robustness-test_white_attackpy"


def test_protocol_has_the_eight_numbered_sections_in_order():
    headings = re.findall(r"^## §(\d+) (.+)$", PROTOCOL.read_text(), re.M)
    assert [(int(n), title) for n, title in headings] == list(SECTIONS.items())


def test_no_project_file_mentions_the_internal_notes():
    mentions = [f"{p.relative_to(ROOT)}:{i}" for p in _project_files()
                for i, line in enumerate(p.read_text(errors="ignore").splitlines(), 1) if INTERNAL_NOTES.search(line)]
    assert mentions == []


def cited_sections(text):
    """Section numbers cited as ``docs/protocol.md §N``, ``§N–M`` (every N..M) or ``§N, §M``."""
    cited = set()
    for first, last, more in CITATION.findall(text):
        cited |= set(range(int(first), int(last or first) + 1)) | {int(m) for m in re.findall(r"\d+", more)}
    return cited


def test_cited_sections_reads_single_ranges_and_lists():
    text = "see docs/protocol.md §2–4 and (docs/protocol.md §1, §8); docs/protocol.md §5: SGD"
    assert cited_sections(text) == {1, 2, 3, 4, 5, 8}


def test_every_cited_protocol_section_exists():
    cited = set().union(*(cited_sections(p.read_text(errors="ignore")) for p in _project_files(".py", ".md")))
    assert cited <= set(SECTIONS), f"cited sections that do not exist: {sorted(cited - set(SECTIONS))}"


@pytest.mark.parametrize("page", ["README.md", "docs/protocol.md"])
def test_relative_links_point_at_existing_files_and_headings(page):
    source = ROOT / page
    broken = []
    for target in LINK.findall(source.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (source.parent / path).resolve() if path else source
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in _anchors(file)):
            broken.append(target)
    assert broken == []


def _script_kinds():
    """{train script: its kind in utils.training.cli.KINDS}, read from each script's main("kind") call."""
    kinds = {}
    for script in sorted(ROOT.glob("train_*.py")):
        match = re.search(r"""main\(["'](\w+)["']\)""", script.read_text())
        kinds[script.name] = match.group(1)
    return kinds


def test_readme_smoke_image_sizes_match_the_code():
    sizes = {script: cli.KINDS[kind].smoke_image_size for script, kind in _script_kinds().items()}
    assert len(sizes) == 4
    text = _section(README.read_text(), "### Quick start")
    n, side, side2 = re.search(r"on (\d+) synthetic (\d+)×(\d+) images", text).groups()
    assert (int(n), int(side), int(side2)) == (cli.SMOKE_DEFAULTS["train_size"], sizes["train_CIFAR10_ResNet.py"],
                                               sizes["train_CIFAR10_ResNet.py"])
    usual, exception, script = re.search(r"images\s+are (\d+)×\d+, except (\d+)×\d+ for `(\w+\.py)`", text).groups()
    assert sizes.pop(script) == int(exception)
    assert set(sizes.values()) == {int(usual)}
    assert {int(a) for a in re.findall(r"(\d+)×\1", text)} <= {int(usual), int(exception)}


def _run_name_pattern():
    """Run folders written by the train_* scripts and reproduce.py:
    [smoke_]<dataset>_<arch>_<method>[_sepbn]_s<seed>[_e<epochs>], lower case."""
    datasets = "|".join(re.escape(name) for name in data.DATASETS)
    return re.compile(rf"(smoke_)?({datasets})_[a-z0-9][a-z0-9-]*_[a-z][a-z-]*(_sepbn)?_s\d+(_e\d+)?")


def test_run_name_pattern_accepts_the_scripts_names_and_rejects_capitals():
    pattern = _run_name_pattern()
    assert pattern.fullmatch("cifar10_resnet18_trades-ancra_s0")
    assert pattern.fullmatch("smoke_synthetic_wrn-34-10_pgd-at_s3")
    assert not pattern.fullmatch("cifar10_resnet18_TRADES-ANCRA_s0")


def test_readme_run_paths_follow_the_run_name_pattern():
    pattern = _run_name_pattern()
    names = re.findall(r"\bruns/([^\s/`'\")]+)", README.read_text())
    run_names = [n.replace("${m}", "trades") for n in names if "_" in n and "<" not in n]
    assert len(run_names) >= 5
    assert [n for n in run_names if not pattern.fullmatch(n)] == []
