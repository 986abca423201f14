"""Figures: tuning heatmaps (accuracy over alpha x k, the AUSteer paper's Figure 10) and unit maps
(scores over layer x unit, its Figure 11).

matplotlib is an optional extra (``pip install 'aufold[plot]'``); nothing else in
aufold needs it. Figures are drawn without pyplot, so no global backend is chosen
for the caller's process.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from aufold.errors import AufoldError
from aufold.safety.outputs import PNG_SOFTWARE, write_file

INSTALL_HINT = "pip install 'aufold[plot]' (or pip install matplotlib)"


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot_heatmap(accuracy: Sequence[Sequence[float]], ks: Sequence[int], alphas: Sequence[float],
                 path: str | Path, *, title: str, base: float | None = None,
                 kl: Sequence[Sequence[float]] | None = None) -> Path:
    """Write a PNG heatmap: one row per alpha, one column per k, each cell's accuracy printed
    (and, with ``kl``, the configuration's KL on neutral text beneath it).

    ``accuracy[i][j]`` belongs to ``alphas[i]`` and ``ks[j]``. With ``base`` (the
    unsteered accuracy) the colours are centred on it: red is worse, blue better.
    """
    if not matplotlib_available():
        raise AufoldError(f"the heatmap needs matplotlib, which is not installed; {INSTALL_HINT}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    values = [list(row) for row in accuracy]
    flat = [value for row in values for value in row]
    # At least wide and tall enough for the title and the colour bar's label on a 1 x 1 grid.
    figure = Figure(figsize=(max(5.0, 1.6 + 0.8 * len(ks)), max(3.2, 1.2 + 0.5 * len(alphas))),
                    dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    norm = None
    if base is not None:
        low, high = min(flat + [base]), max(flat + [base])
        spread = max(high - base, base - low, 1e-6)
        norm = TwoSlopeNorm(vcenter=base, vmin=base - spread, vmax=base + spread)
    image = axes.imshow(values, cmap="RdBu", norm=norm, aspect="auto", origin="lower")
    axes.set_xticks(range(len(ks)), [str(k) for k in ks])
    axes.set_yticks(range(len(alphas)), [f"{alpha:g}" for alpha in alphas])
    axes.set_xlabel("k (steered units)")
    axes.set_ylabel("alpha")
    axes.set_title(title, fontsize=9)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            # White text on the darkest cells, where black would be hard to read.
            dark = norm is not None and abs(float(norm(value)) - 0.5) > 0.35
            text = f"{value:.2f}" if kl is None else f"{value:.2f}\nKL {kl[i][j]:.2g}"
            axes.text(j, i, text, ha="center", va="center", fontsize=7,
                      color="white" if dark else "black")
    colorbar = figure.colorbar(image, ax=axes)
    colorbar.set_label("accuracy" + (f" (base {base:.3f} at centre)" if base is not None else ""))
    return _save(figure, path)


def plot_unit_scores(scores: Mapping[str, torch.Tensor], chosen: Sequence[tuple[str, int, int]],
                     path: str | Path, *, title: str) -> Path:
    """Write a PNG of where the units sit (like the AUSteer paper's Figure 11).

    One panel per site: the score max(r_pos, r_neg) of every unit, layers down and
    units across; ``chosen`` (site, layer, unit) are circled.
    """
    if not matplotlib_available():
        raise AufoldError(f"the plot needs matplotlib, which is not installed; {INSTALL_HINT}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sites = list(scores)
    figure = Figure(figsize=(4.2 * len(sites), 3.6), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes_row = figure.subplots(1, len(sites), squeeze=False)[0]
    for axes, site in zip(axes_row, sites):
        values = scores[site].float().numpy()
        image = axes.imshow(values, cmap="viridis", vmin=0.5, vmax=1.0, aspect="auto",
                            interpolation="nearest", origin="lower")
        marked = [(unit, layer) for s, layer, unit in chosen if s == site]
        if marked:
            axes.scatter([u for u, _ in marked], [layer for _, layer in marked], s=36,
                         facecolors="none", edgecolors="red", linewidths=1.2)
        axes.set_title(f"{site} ({len(marked)} chosen)", fontsize=9)
        axes.set_xlabel("unit")
        axes.set_ylabel("layer")
        figure.colorbar(image, ax=axes, label="score max(r_pos, r_neg)")
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def plot_tradeoff(points: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, *,
                  title: str, base: float, budgets: Sequence[float] = ()) -> Path:
    """Write a PNG of accuracy against KL on neutral text, one marker per configuration and a
    colour per method (``points[method] = [(kl, accuracy), ...]``); dashed lines mark the
    unsteered accuracy and the KL budgets."""
    if not matplotlib_available():
        raise AufoldError(f"the plot needs matplotlib, which is not installed; {INSTALL_HINT}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 4.0), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    # A marker per method, the first method drawn last: configurations that coincide (the
    # same units at nearly the same strength) stay visible.
    for (method, values), marker in reversed(list(zip(points.items(), "o^sDvP*X"))):
        axes.scatter([max(kl, 1e-6) for kl, _ in values], [acc for _, acc in values], s=22,
                     marker=marker, label=method, alpha=0.75)
    axes.axhline(base, color="grey", linestyle="--", linewidth=0.8, label="unsteered")
    for budget in budgets:
        axes.axvline(budget, color="black", linestyle=":", linewidth=0.6)
    axes.set_xscale("log")
    axes.set_xlabel("KL(base || steered) on neutral text, nats/token (log)")
    axes.set_ylabel("accuracy")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7)
    return _save(figure, path)


def _save(figure: Any, path: str | Path) -> Path:
    """Save with every label inside the image (bbox_inches="tight" grows it to fit), marked as
    aufold's (so --overwrite may replace it), through a temporary file and a rename."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.1,
                   metadata={"Software": PNG_SOFTWARE})
    return write_file(Path(path), buffer.getvalue())
