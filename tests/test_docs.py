"""Documentation that stays true: the protocol page's sections exist where code and README cite
them, README links resolve, and README's smoke sizes and run paths match the code."""
import importlib.util
import os
import re
import shlex
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


@pytest.mark.parametrize("page", ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_point_at_existing_files_and_headings(page):
    source = ROOT / page if page == "README.md" else ROOT / "docs" / page
    broken = []
    for target in LINK.findall(source.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (source.parent / path).resolve() if path else source
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in _anchors(file)):
            broken.append(target)
    assert broken == []


def _train_defaults():
    """{training script: its ``DEFAULTS`` (utils.training.cli.Defaults)} for train.py and train_*.py."""
    found = {}
    for script in sorted([ROOT / "train.py", *ROOT.glob("train_*.py")]):
        spec = importlib.util.spec_from_file_location(f"doc_{script.stem}", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found[script.name] = module.DEFAULTS
    return found


def test_readme_smoke_image_sizes_match_the_code():
    sizes = {script: d.smoke_image_size for script, d in _train_defaults().items()}
    assert len(sizes) == 5
    text = _section(README.read_text(), "## Quick start")
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
    names = [n for page in _doc_pages() for n in re.findall(r"\bruns/([^\s/`'\")]+)", page.read_text())]
    run_names = [n.replace("${m}", "trades") for n in names if "_" in n and "<" not in n]
    assert len(run_names) >= 5
    assert [n for n in run_names if not pattern.fullmatch(n)] == []


# ------------------------------------------------- every command shown in the README and docs parses
FENCE = re.compile(r"```(?:bash|sh|shell|console)?\n(.*?)```", re.S)
COMMAND = re.compile(r"^(?:\S*/)?(?:python3?|torchrun(?: --?\S+)*) +(-m +\S+|\S+\.py)(.*)$")


def _doc_pages():
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands(markdown):
    """``(script, argv)`` of every ``python SCRIPT ...`` / ``torchrun ... SCRIPT ...`` line in the fenced
    blocks of a Markdown text: continuation lines joined, comments dropped, ``${m}`` read as ``trades``
    and a brace list ``{A,B}`` as its first item."""
    commands = []
    for block in FENCE.findall(markdown):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#.*$", "", line.strip()).replace("${m}", "trades")
            line = re.sub(r"\{([^,{}]+),[^{}]*\}", r"\1", line)
            match = COMMAND.match(line)
            if match:
                script = match.group(1).replace("-m ", "").strip()
                commands.append((script, shlex.split(match.group(2))))
    return commands


def test_shown_commands_reads_continuations_comments_and_torchrun():
    text = "```bash\npython a.py --x 1 \\\n  --y 2   # note\ntorchrun --standalone --nproc_per_node=4 b.py --z\nls\n```"
    assert shown_commands(text) == [("a.py", ["--x", "1", "--y", "2"]), ("b.py", ["--z"])]


def _parser_of(script):
    """The function that parses ``script``'s command line (parsing only: nothing runs)."""
    if script.startswith("train") and script in _train_defaults():
        return cli.build_parser(_train_defaults()[script]).parse_args
    if script == "utils.reproduce.bn":
        from utils.reproduce import bn
        return bn.parse_args
    module_name = script.removesuffix(".py").replace("/", ".")
    spec = importlib.util.spec_from_file_location(f"doc_{module_name.replace('.', '_')}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # every script guards its work with `if __name__ == "__main__"`
    if hasattr(module, "build_parser"):
        return module.build_parser().parse_args
    return module.parse_args


def _placeholder_missing(error):
    """A script that checks its input files while parsing, refusing a placeholder path such as RUN/best.pt."""
    return re.search(r"\b[A-Z][A-Z_]+/\S* not found", error) is not None


def test_every_command_in_the_readme_and_docs_parses(capsys):
    """Each command a page shows names a script that exists and options that script accepts."""
    bad, seen = [], 0
    for page in _doc_pages():
        for script, argv in shown_commands(page.read_text()):
            seen += 1
            if not script.startswith("utils.") and not (ROOT / script).is_file():
                bad.append(f"{page.name}: {script} does not exist")
                continue
            try:
                _parser_of(script)(argv)
            except SystemExit as stop:
                error = capsys.readouterr().err
                if stop.code not in (0, None) and not _placeholder_missing(error):
                    bad.append(f"{page.name}: {script} {' '.join(argv)}: {error.strip()}")
    assert seen >= 20
    assert bad == []


def test_every_cited_docs_page_exists():
    """Code, docs and tests cite only documentation pages that exist (``docs/<page>.md``)."""
    files = _project_files(".py", ".md", ".txt")
    cited = {m for p in files for m in re.findall(r"docs/[\w-]+\.md", p.read_text(errors="ignore"))}
    assert sorted(c for c in cited if not (ROOT / c).is_file()) == []


def test_every_cited_docs_anchor_exists():
    """``docs/<page>.md#<anchor>`` in code, docs and tests names a heading of that page."""
    files = _project_files(".py", ".md", ".txt", ".cfg", ".toml")
    cited = {m for p in files for m in re.findall(r"docs/([\w-]+\.md)#([\w-]+)", p.read_text(errors="ignore"))}
    assert len(cited) >= 5
    assert sorted(f"{page}#{a}" for page, a in cited
                  if not (ROOT / "docs" / page).is_file() or a not in _anchors(ROOT / "docs" / page)) == []


def test_indicator_links_in_reports_name_headings_of_their_page():
    """Each indicator of attack failure points the report's reader at its own section of the docs."""
    from utils.evaluation import indicators
    page, _, _ = indicators._anchor("silent success").partition("#")
    anchors = _anchors(ROOT / page)
    assert [name for name in indicators.MEANINGS if indicators._anchor(name).partition("#")[2] not in anchors] == []


def test_docs_are_the_readme_plus_at_most_five_pages_all_listed_in_it():
    """A researcher's evening: README plus at most 5 pages, each in the README's documentation table."""
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    table = _section(README.read_text(), "## Documentation")
    assert len(pages) <= 5
    assert [p for p in pages if f"(docs/{p})" not in table] == []
