"""What ``--resume`` may change. The resumed run's record is the starting point and only the
options on the command line are applied to it; refused are the ones that would change the run:
its folder (``--run-name``, ``--out-dir``, ``--overwrite``, ``--smoke``), its identity (method,
ANC/RA, architecture, data) and its validation split. Schedule changes rebuild the optimiser's
schedule from the next epoch."""
from pathlib import Path

from utils.cli import flag
from utils.training.errors import ConfigError

IDENTITY = ("method", "anc", "ra", "arch", "dataset", "image_size", "separate_bn")
SCHEDULE = ("lr", "momentum", "weight_decay", "milestones")
NOT_COMPARED = ("world_size",)  # a fact of the launch, not an option


def refuse_folder_options(given, run_dir, saved):
    """With ``--resume`` the run folder is the resumed one: ``--run-name`` / ``--out-dir`` naming
    another folder, ``--overwrite``, and ``--smoke`` for a run that was not a smoke run are refused
    (repeating the original launch's folder options is accepted). ``given``: the options on the
    command line; ``saved``: the run's record."""
    run_dir = Path(run_dir).resolve()
    elsewhere = [flag(name) for name, differs in (
        ("run_name", lambda: given["run_name"] != run_dir.name),
        ("out_dir", lambda: Path(given["out_dir"]).resolve() != run_dir.parent)) if name in given and differs()]
    if elsewhere:
        raise ConfigError(f"{' and '.join(elsewhere)} point{'s' if len(elsewhere) == 1 else ''} away from the "
                          f"resumed run {run_dir}: a resumed run keeps its folder; drop "
                          f"{'it' if len(elsewhere) == 1 else 'them'}")
    if "overwrite" in given:
        raise ConfigError("--overwrite cannot be combined with --resume: resuming continues the run; drop it")
    if "smoke" in given and not saved.smoke:
        raise ConfigError(f"--smoke cannot resume {run_dir}: it is not a smoke run; drop --smoke")


def refuse_identity_changes(saved, current):
    """The method, ANC/RA choice, architecture and data of a resumed run cannot change."""
    if saved.method_name != current.method_name:
        raise ConfigError(f"cannot resume as {current.method_name}: the run was trained as {saved.method_name}; "
                          f"start a new run (another --run-name) to change it")
    for key in IDENTITY:
        if getattr(saved, key) != getattr(current, key):
            raise ConfigError(f"cannot resume with {key.replace('_', ' ')} {getattr(current, key)!r}: the run was "
                              f"trained with {getattr(saved, key)!r}; start a new run (another --run-name) to change it")


def refuse_split_changes(saved, current):
    """A run with a validation split (``--val-size``) keeps its seed and split size: the held-out
    images are drawn with ``--seed``, so a change would move held-out images into training while
    best.pt is still said to be chosen on held-out data."""
    held_out, val_size, seed = saved.val_size, current.val_size, current.seed
    if not held_out and not val_size:
        return
    if val_size != held_out:
        now = (f"holds out {held_out} training images to choose best.pt" if held_out else
               "trains on all its images and chooses best.pt on the test subset")
        raise ConfigError(f"cannot resume with --val-size {val_size}: the run {now}, and another split would "
                          f"mix held-out and training images; drop --val-size or start a new run (another --run-name)")
    if saved.seed != seed:
        raise ConfigError(f"cannot resume with --seed {seed}: the run's validation split (--val-size "
                          f"{held_out}) was drawn with --seed {saved.seed} and another seed would move held-out "
                          f"images into training; drop --seed or start a new run (another --run-name)")


def schedule_changed(saved, current):
    """Whether lr, momentum, weight decay or milestones differ from the resumed run's."""
    return any(getattr(saved, key) != getattr(current, key) for key in SCHEDULE)


def changed_options(saved, current):
    """``["lr 0.01 -> 0.05", ...]``: the options that differ from the resumed run's."""
    old, new = saved.__dict__, current.__dict__
    return [f"{k} {old[k]!r} -> {new[k]!r}" for k in new if old[k] != new[k] and k not in NOT_COMPARED]
