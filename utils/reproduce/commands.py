"""The command lines reproduce.py runs: the training scripts (fresh, resumed, or under torchrun),
test_white_attack.py, the BatchNorm check and the figure scripts. Every path is absolute, so the
children run in the user's working directory (where ``./data`` is)."""
import sys
from dataclasses import dataclass

from utils.evaluation.catalogue import PRESETS
from utils.evaluation.suite import BUDGETS, Settings, attack_catalogue, select_attacks
from utils.reproduce.plan import ROOT

# Every paper-protocol attack keeps its place in the smoke list; this is the list when the
# evaluation's catalogue cannot be read.
FALLBACK_SMOKE_ATTACKS = "fgsm,fgsm+p,pgd40,pgd40+p,cw40,cw40+p,pgd10"
# Smoke rows train on the scripts' own smoke images (16x16: a smoke ResNet-18 learns them in its two
# epochs, so the attacks, negatives and statistics see examples; at 8x8 most rows stayed at chance).
# The WideResNet rows keep 8x8 images: a WRN-34-10 smoke run at 16x16 takes minutes on a CPU.
SMOKE_OPTIONS = {"wideresnet": ("--image-size", "8")}


def python_command(plan, script, training=False):
    """``python SCRIPT`` or, for training with several processes per row, torchrun."""
    if training and plan.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={plan.nproc}",
                str(ROOT / script)]
    return [sys.executable, str(ROOT / script)]


def _data_dir(plan):
    return ["--data-dir", plan.data_dir] if plan.data_dir else []


def train_command(plan, row, resume):
    """Train ``row`` from scratch into its run folder, or resume it (only ``--resume RUN``: the run's
    own arguments hold the rest)."""
    run_dir = plan.run_dir(row)
    command = python_command(plan, row.script, training=True)
    if resume:
        return command + ["--resume", str(run_dir), "--quiet"]
    command += list(row.options) + ["--dataset", plan.dataset, "--epochs", str(plan.epochs), "--milestones",
                                    *map(str, plan.milestones), "--seed", str(plan.seed_of(row)), "--out-dir",
                                    str(plan.runs_dir(row)), "--run-name", run_dir.name, "--quiet"]
    if plan.smoke:
        command += ["--smoke", *SMOKE_OPTIONS.get(row.kind, ())]
    if run_dir.exists():  # a start that never finished an epoch: nothing to keep
        command.append("--overwrite")
    return command + _data_dir(plan)


@dataclass(frozen=True)
class EvaluationTool:
    """What the evaluation offers: ``--resume`` and the ``reference`` preset (fixed flags, so tests
    can build plans without them)."""

    resume: bool
    reference: bool

    @classmethod
    def probe(cls):
        """This project's test_white_attack.py: it resumes and has the ``reference`` preset."""
        return cls(resume=True, reference="reference" in PRESETS)

    def attacks(self, smoke):
        """The ``--attacks`` request: everything (plus the reference protocol), or the smoke list."""
        return smoke_attacks(self.reference) if smoke else ("all,reference" if self.reference else "all")


def smoke_attacks(reference):
    """Every paper-protocol (and reference-protocol) attack and the first attack of each adaptive and
    sanity family, leaving out whatever needs the AutoAttack package (minutes on a CPU)."""
    try:
        catalogue = attack_catalogue(Settings(budget=BUDGETS["small"]), 10)
        specs, _ = select_attacks("all,reference" if reference else "all", catalogue, True)
    except (ImportError, TypeError, ValueError, KeyError):
        return FALLBACK_SMOKE_ATTACKS
    kept, families = [], set()
    for spec in specs:
        if spec.needs_autoattack:
            continue
        if spec.preset in ("paper", "reference") or spec.name.startswith("ref-") or spec.family not in families:
            kept.append(spec.name)
            families.add(spec.family)
    return ",".join(kept)


def evaluate_command(plan, row, tool, resume):
    """test_white_attack.py on the row's best.pt into its reproduce evaluation folder."""
    command = python_command(plan, "test_white_attack.py") + [
        "--ckpt", str(plan.run_dir(row) / "best.pt"), "--attacks", tool.attacks(plan.smoke),
        "--n-examples", str(plan.n_examples), "--budget", plan.budget, "--out-dir", str(plan.eval_dir(row)),
        "--seed", str(plan.seed_of(row)), "--quiet"] + _data_dir(plan)
    if not plan.smoke:  # the table's AA columns: AutoAttack on every example, not only on cascade survivors
        command += ["--full-set", "autoattack,autoattack+p"]
    return command + (["--resume"] if resume and tool.resume else [])


def batchnorm_command(plan, row):
    """The BatchNorm check (utils/reproduce/bn.py) on the evaluated subset."""
    return [sys.executable, "-m", "utils.reproduce.bn", "--ckpt", str(plan.run_dir(row) / "best.pt"),
            "--n-examples", str(plan.n_examples), "--out", str(plan.bn_file(row))] + _data_dir(plan)


def features_command(plan, row, output):
    """feature_distance.py for class 0 (paper Fig. 1, 3) into ``output``."""
    command = python_command(plan, "feature_distance.py") + [
        "--ckpt", str(plan.run_dir(row) / "best.pt"), "--target-label", "0", "--output", str(output),
        "--seed", str(plan.seed), "--quiet"] + _data_dir(plan)
    return command + (["--n-examples", str(plan.n_examples)] if plan.smoke else [])


def umap_command(plan, row, out_dir):
    """draw_umap.py on ``plan.n_examples`` test images into ``out_dir``."""
    return python_command(plan, "draw_umap.py") + [
        "--ckpt", str(plan.run_dir(row) / "best.pt"), "--n-examples", str(plan.n_examples), "--seed",
        str(plan.seed), "--out-dir", str(out_dir), "--quiet"] + _data_dir(plan)


def histogram_command(plan, rows, out_dir):
    """draw_hist.py over the rows' feature files, labelled as the paper names the methods."""
    return python_command(plan, "draw_hist.py") + [str(plan.features_file(r)) for r in rows] + [
        "--labels", *[r.label for r in rows], "--out-dir", str(out_dir)]
