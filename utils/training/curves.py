"""``curves.png``: clean / PGD accuracy and the loss terms per epoch, redrawn after every epoch."""
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from utils.checkpoint import atomic_write_bytes  # noqa: E402

ACCURACY_KEYS = ("nat", "pgd")
NOT_LOSSES = ("acc_", "anc_fired", "neg_valid")


def loss_terms(records):
    """Names of the loss terms present in the records' ``train`` dicts, in first-seen order."""
    names = []
    for record in records:
        for key in record["train"]:
            if not key.startswith(NOT_LOSSES) and key not in names:
                names.append(key)
    return names


def plot_curves(records, path, title=None):
    """Draw the two panels for the epoch ``records`` (see :mod:`utils.training.records`) into ``path`` atomically."""
    epochs = [r["epoch"] for r in records]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("test", "-"), ("val", "--")):
        for key, color in zip(ACCURACY_KEYS, ("tab:blue", "tab:red")):
            points = [(r["epoch"], 100 * r[split][key]) for r in records if split in r]
            if points:
                label_attack = records[-1].get("eval_attack", "PGD") if key == "pgd" else "clean"
                acc_ax.plot(*zip(*points), style, color=color, marker="o", markersize=3,
                            label=f"{split} {label_attack}")
    train_adv = [(r["epoch"], 100 * r["train"]["acc_adv"]) for r in records if "acc_adv" in r["train"]]
    if train_adv:
        acc_ax.plot(*zip(*train_adv), ":", color="tab:gray", label="train adversarial (running mean, train mode)")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for name in loss_terms(records):
        points = [(r["epoch"], r["train"][name]) for r in records if name in r["train"]]
        loss_ax.plot(*zip(*points), marker="o", markersize=3, label=name)
    loss_ax.set(xlabel="epoch", ylabel="mean over the epoch", title="training loss terms")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
