"""What ``--resume`` may change: the options it refuses (the run's identity and folder), the
options it takes from the resumed run, and the schedule options whose change rebuilds the
optimizer's schedule."""
from pathlib import Path

from utils.training.errors import ConfigError

NOT_RESTORED = ("resume", "overwrite", "world_size")          # never taken from the resumed run
IDENTITY = ("method", "anc", "reverse_attention", "attack_loss", "arch", "dataset", "image_size")
SCHEDULE = ("lr", "momentum", "weight_decay", "milestones")


def refuse_folder_options(explicit, given, run_dir, saved):
    """With ``--resume`` the run folder is the resumed one: ``--run-name`` / ``--out-dir`` naming
    another folder, ``--overwrite``, and ``--smoke`` for a run that was not a smoke run are refused
    (repeating the original launch's folder options is accepted)."""
    run_dir = Path(run_dir).resolve()
    elsewhere = [f"--{name.replace('_', '-')}" for name, differs in (
        ("run_name", lambda: given.run_name != run_dir.name),
        ("out_dir", lambda: Path(given.out_dir).resolve() != run_dir.parent)) if name in explicit and differs()]
    if elsewhere:
        raise ConfigError(f"{' and '.join(elsewhere)} point{'s' if len(elsewhere) == 1 else ''} away from the "
                          f"resumed run {run_dir}: a resumed run keeps its folder; drop "
                          f"{'it' if len(elsewhere) == 1 else 'them'}")
    if "overwrite" in explicit:
        raise ConfigError("--overwrite cannot be combined with --resume: resuming continues the run; drop it")
    if "smoke" in explicit and not saved.get("smoke"):
        raise ConfigError(f"--smoke cannot resume {run_dir}: it is not a smoke run; drop --smoke")


def refuse_identity_changes(saved, current):
    """The method, ANC/RA choice, architecture and data of a resumed run cannot change
    (``saved``: its args record; ``current``: the one this command builds)."""
    for key in IDENTITY:
        if key in saved and saved[key] != current[key]:
            raise ConfigError(f"cannot resume with {key.replace('_', ' ')} {current[key]!r}: the run was "
                              f"trained with {saved[key]!r}; start a new run (another --run-name) to change it")


def refuse_split_changes(saved, current):
    """A run with a validation split (``--val-size``) keeps its seed and split size: the held-out
    images are drawn with ``--seed``, so a change would move held-out images into training while
    best.pt is still said to be chosen on held-out data."""
    held_out = saved.get("val_size", 0) or 0
    val_size, seed = current["val_size"], current["seed"]
    if not held_out and not val_size:
        return
    if val_size != held_out:
        now = (f"holds out {held_out} training images to choose best.pt" if held_out else
               "trains on all its images and chooses best.pt on the test subset")
        raise ConfigError(f"cannot resume with --val-size {val_size}: the run {now}, and another split would "
                          f"mix held-out and training images; drop --val-size or start a new run (another --run-name)")
    if "seed" in saved and saved["seed"] != seed:
        raise ConfigError(f"cannot resume with --seed {seed}: the run's validation split (--val-size "
                          f"{held_out}) was drawn with --seed {saved['seed']} and another seed would move held-out "
                          f"images into training; drop --seed or start a new run (another --run-name)")


def schedule_changed(saved, current):
    """Whether lr, momentum, weight decay or milestones differ from the resumed run's."""
    return any(key in saved and _plain(saved[key]) != _plain(current[key]) for key in SCHEDULE)


def changed_options(saved, current):
    """``["lr 0.01 -> 0.05", ...]``: the options that differ from the resumed run's."""
    return [f"{k} {saved[k]!r} -> {v!r}" for k, v in current.items()
            if k in saved and _plain(saved[k]) != _plain(v) and k not in NOT_RESTORED]


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
