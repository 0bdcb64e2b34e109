"""Figures of the feature analysis (docs/protocol.md §6): the paper's four overlaid histograms (Fig. 1, 3)
and a UMAP scatter of natural / adversarial features. Headless (Agg backend)."""
import io
import json
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from utils.analysis.features import FeatureError, check_finite
from utils.evaluation.options import write_bytes

# (array key, panel title, x-axis label, file stem), in the paper's panel order
PANELS = (
    ("np_cos", "(a) NP cosine", "cosine similarity", "hist_np_cos"),
    ("np_l2", "(b) NP L2", "L2 distance", "hist_np_l2"),
    ("pp_cos", "(c) PP cosine", "cosine similarity", "hist_pp_cos"),
    ("pp_l2", "(d) PP L2", "L2 distance", "hist_pp_l2"),
)
FORMATS = ("png", "pdf")
PANEL_SIZE = (5.0, 3.8)


def method_colors(n):
    """``n`` distinct colours: tab10, then tab20 for more methods."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def shared_bins(arrays, n_bins=20):
    """``n_bins`` equal-width bin edges covering every array, so methods are comparable."""
    return np.histogram_bin_edges(np.concatenate([np.asarray(a, dtype=np.float64) for a in arrays]), bins=n_bins)


def mixed_metadata(runs, paths, keys=("target_label", "dataset", "strategy")):
    """Warnings (one per key) naming the files whose ``key`` differs, e.g. mixed classes."""
    messages = []
    for key in keys:
        values = [run.get(key) for run in runs]
        if len(set(values)) > 1:
            listed = ", ".join(f"{path} ({key}={value})" for path, value in zip(paths, values))
            messages.append(f"files with different {key} mixed in one histogram: {listed}")
    return messages


def run_name(run, path):
    """A short name of the run a feature file came from: its checkpoint's folder and file
    (``RUN/best.pt``), else the feature file's name."""
    checkpoint = str(run.get("checkpoint") or "")
    if checkpoint:
        ckpt = Path(checkpoint)
        return f"{ckpt.parent.name}/{ckpt.name}" if ckpt.parent.name else ckpt.name
    return Path(str(path)).name


def distinct_labels(labels, runs, paths):
    """Legend labels that tell every file apart: a label shared by several files (two runs of one
    method) gets the run's name added, or the file's name when the runs' names are shared too."""
    labels = [str(label) for label in labels]
    out = list(labels)
    for label in set(labels):
        group = [i for i, other in enumerate(labels) if other == label]
        if len(group) < 2:
            continue
        names = [run_name(runs[i], paths[i]) for i in group]
        if len(set(names)) < len(names):
            names = [str(paths[i]) for i in group]
        for i, name in zip(group, names):
            out[i] = f"{label} ({name})"
    return out


def _eps_text(eps):
    k = float(eps) * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{float(eps):g}"


def _joined(values):
    values = list(dict.fromkeys(str(v) for v in values))
    return values[0] if len(values) == 1 else "mixed: " + ", ".join(values)


def histogram_caption(runs, paths):
    """What the histograms show, under the figure: class, dataset, ε and steps of the adversarial
    examples, the NP strategy, n, and which run each legend entry is."""
    eps, steps = [], []
    for run in runs:
        try:
            ae = json.loads(str(run.get("attack")))["ae"]
            eps.append(_eps_text(ae["eps"]))
            steps.append(f"PGD-{ae['steps']}")
        except (ValueError, KeyError, TypeError):
            eps.append("?")
            steps.append("PGD")
    first = (f"class {_joined(r.get('target_label') for r in runs)} of {_joined(r.get('dataset') for r in runs)} "
             f"(test split), adversarial examples {_joined(steps)} at ε = {_joined(eps)}, NP strategy "
             f"{_joined(r.get('strategy') for r in runs)}, n = {_joined(r.get('n_examples') for r in runs)}")
    return first + "\nruns: " + "; ".join(run_name(run, path) for run, path in zip(runs, paths))


def _draw_panel(ax, key, title, xlabel, runs, labels, n_bins, legend):
    """Overlay one metric of every run: translucent bars plus an outline in the run's colour."""
    bins = shared_bins([run[key] for run in runs], n_bins)
    for run, label, color in zip(runs, labels, method_colors(len(runs))):
        ax.hist(run[key], bins=bins, density=True, color=color, alpha=0.3)
        ax.hist(run[key], bins=bins, density=True, color=color, histtype="step", linewidth=1.6, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    if legend:
        ax.legend(fontsize="small", frameon=False)


def _save(fig, stem):
    """Write ``stem``.png and ``stem``.pdf, each replaced atomically (a full disk leaves the previous
    file intact: ``OutputError``); returns the paths."""
    try:
        images = []
        for fmt in FORMATS:
            buffer = io.BytesIO()
            fig.savefig(buffer, format=fmt, dpi=150, bbox_inches="tight")
            images.append((Path(f"{stem}.{fmt}"), buffer.getvalue()))
    finally:
        plt.close(fig)
    return [write_bytes(path, data) for path, data in images]


def combined_histogram(runs, labels, n_bins=20, caption=None):
    """The four panels in one 2×2 figure with one legend above them and the caption below."""
    fig, axes = plt.subplots(2, 2, figsize=(2 * PANEL_SIZE[0], 2 * PANEL_SIZE[1]), layout="constrained")
    for ax, (key, title, xlabel, _) in zip(axes.flat, PANELS):
        _draw_panel(ax, key, title, xlabel, runs, labels, n_bins, legend=False)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside upper center", ncol=min(len(names), 4), frameon=False)
    if caption:
        fig.legend(handles=[], title=caption, loc="outside lower center", frameon=False, title_fontsize="small")
    return fig


def panel_histogram(panel, runs, labels, n_bins=20, caption=None):
    """One panel of :data:`PANELS` alone, with its own legend and the caption below."""
    key, title, xlabel, _ = panel
    fig, ax = plt.subplots(figsize=PANEL_SIZE, layout="constrained")
    _draw_panel(ax, key, title, xlabel, runs, labels, n_bins, legend=True)
    if caption:
        fig.legend(handles=[], title=caption, loc="outside lower center", frameon=False, title_fontsize="x-small")
    return fig


def histogram_figures(runs, labels, out_dir, n_bins=20, paths=None):
    """``hist_all`` plus one file per panel (``hist_np_cos``, ...), PNG and PDF; returns the paths.
    ``paths`` (the feature files) make repeated labels distinct and name the runs in the caption."""
    for run in runs:
        for key, title, _, _ in PANELS:
            check_finite(np.asarray(run[key], dtype=np.float64), f"the {title} values of {run.get('label', 'a run')}")
    files = list(paths) if paths is not None else [f"file {i + 1}" for i in range(len(runs))]
    labels = distinct_labels(labels, runs, files)
    caption = histogram_caption(runs, files)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = _save(combined_histogram(runs, labels, n_bins, caption), out_dir / "hist_all")
    for panel in PANELS:
        written += _save(panel_histogram(panel, runs, labels, n_bins, caption), out_dir / panel[3])
    return written


def umap_embedding(features, seed=0, n_neighbors=15, min_dist=0.1):
    """2-D UMAP of an N×R array; a fixed ``seed`` makes it deterministic (single-threaded)."""
    import umap  # heavy import (numba), only when a UMAP is drawn

    features = np.asarray(check_finite(np.asarray(features, dtype=np.float32), "the features to embed"))
    reducer = umap.UMAP(n_neighbors=min(n_neighbors, len(features) - 1), min_dist=min_dist,
                        random_state=seed, n_jobs=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*", category=UserWarning)
        embedding = reducer.fit_transform(features).astype(np.float32)
    if not np.isfinite(embedding).all():
        raise FeatureError("UMAP returned NaN or infinite coordinates; try other --n-neighbors / --min-dist")
    return embedding


def umap_figure(embedding, labels, is_adv, class_names, title, stem):
    """Scatter of the embedding coloured by class, ``o`` natural / ``x`` adversarial; PNG and PDF."""
    labels, is_adv = np.asarray(labels), np.asarray(is_adv, dtype=bool)
    n_classes = len(class_names)
    cmap = plt.get_cmap("tab10" if n_classes <= 10 else "tab20" if n_classes <= 20 else "turbo")
    colour_of = (lambda c: cmap(c)) if n_classes <= 20 else (lambda c: cmap(c / max(n_classes - 1, 1)))
    colours = np.array([colour_of(c) for c in labels]).reshape(-1, 4)
    fig, ax = plt.subplots(figsize=(8.5, 6.5), layout="constrained")
    ax.scatter(*embedding[~is_adv].T, c=colours[~is_adv], marker="o", s=10, alpha=0.7, linewidths=0)
    ax.scatter(*embedding[is_adv].T, c=colours[is_adv], marker="x", s=14, alpha=0.7, linewidths=0.9)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(title)
    handles = [Line2D([], [], marker="o", linestyle="", color="0.3", label="natural"),
               Line2D([], [], marker="x", linestyle="", color="0.3", label="adversarial")]
    if n_classes <= 20:
        present = sorted(set(labels.tolist()))
        handles += [Line2D([], [], marker="s", linestyle="", color=colour_of(c), label=str(class_names[c]))
                    for c in present]
    else:
        handles.append(Line2D([], [], linestyle="", label=f"colour: class (0–{n_classes - 1})"))
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", frameon=False)
    return _save(fig, Path(stem))
