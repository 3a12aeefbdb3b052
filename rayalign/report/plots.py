"""The figures of `rayalign report`: each draws numbers computed elsewhere. matplotlib is imported when a
figure is drawn."""

from __future__ import annotations

import math

from rayalign.report.document import MAX_BAR_RUNS, TITLES, format_value


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), layout="constrained")


def _colors(names) -> dict:
    from matplotlib import colormaps

    names = list(dict.fromkeys(names))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _grid(fig, panels: int, columns: int = 3):
    columns = min(columns, panels)
    rows = math.ceil(panels / columns)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return axes[:panels]


def _integer_ticks(ax) -> None:
    """x ticks at the iterations or layers drawn (call after plotting); one point gets some room either side."""
    from matplotlib.ticker import MaxNLocator

    xs = sorted({int(x) for line in ax.get_lines() for x in line.get_xdata()})
    if len(xs) > 12:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    elif xs:
        ax.set_xticks(xs)
        if len(xs) == 1:
            ax.set_xlim(xs[0] - 1, xs[0] + 1)


def _plain_y(ax) -> None:
    """Tick labels as plain numbers: no '1e-5+6.819e-1' offset over the panel title."""
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")


def plot_rewards(series: list[tuple[str, dict[str, dict[str, list[float]]]]]):
    """Box plots per language, one panel per reward column, one box colour per series (samples or eval label)."""
    from matplotlib.patches import Patch

    columns = list(dict.fromkeys(c for _, values in series for c in values))
    langs = list(dict.fromkeys(lang for _, values in series for by_lang in values.values() for lang in by_lang))
    colors = _colors(name for name, _ in series)
    width = 0.8 / len(series)
    panel_width = min(9.0, max(3.5, 0.45 * len(langs) * len(series) + 1.5))
    ncols = min(3, len(columns))
    fig = _figure(panel_width * ncols, 3.6 * math.ceil(len(columns) / ncols) + 0.4)
    for ax, column in zip(_grid(fig, len(columns)), columns):
        for j, (name, values) in enumerate(series):
            by_lang = values.get(column, {})
            positions = [i - 0.4 + width * (j + 0.5) for i, lang in enumerate(langs) if lang in by_lang]
            if not positions:
                continue
            ax.boxplot([by_lang[lang] for lang in langs if lang in by_lang], positions=positions, widths=width * 0.85,
                       patch_artist=True, boxprops={"facecolor": colors[name], "alpha": 0.75},
                       medianprops={"color": "black"}, flierprops={"markersize": 2, "alpha": 0.4})
        ax.set_xticks(range(len(langs)), langs)
        ax.set_xlim(-0.6, len(langs) - 0.4)
        ax.set_title(column)
        ax.set_xlabel("language")
        ax.set_ylabel("reward")
        ax.grid(axis="y", alpha=0.3)
    fig.legend([Patch(facecolor=colors[name], alpha=0.75) for name, _ in series], [name for name, _ in series],
               loc="outside lower center", ncols=min(4, len(series)), frameon=False)
    return fig


def plot_fidelity(by_iteration: dict[str, list[tuple[int, float]]], by_eval: dict[str, dict[str, float]]):
    """Left: fidelity per iteration (one line per language, the mean thick); right: fidelity per eval label."""
    langs = [k for k in by_iteration if k != "mean"] + [k for v in by_eval.values() for k in v if k != "all"]
    colors = _colors(sorted(set(langs)))
    panels = [p for p in ("iterations", "eval") if (by_iteration if p == "iterations" else by_eval)]
    fig = _figure(5.2 * len(panels) + 1.0, 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    handles = {}
    for ax, panel in zip(axes, panels):
        if panel == "iterations":
            lines = {k: v for k, v in by_iteration.items() if k != "mean"}
            mean = by_iteration.get("mean")
            ax.set_xlabel("iteration")
            ax.set_title("samples generated in each iteration")
        else:
            labels = list(by_eval)
            lines = {lang: [(i, by_eval[label][lang]) for i, label in enumerate(labels) if lang in by_eval[label]]
                     for lang in sorted({k for v in by_eval.values() for k in v if k != "all"})}
            mean = [(i, by_eval[label]["all"]) for i, label in enumerate(labels) if "all" in by_eval[label]]
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.3, len(labels) - 0.7)
            ax.set_xlabel("evaluated policy")
            ax.set_title("evaluation")
        for lang, points in lines.items():
            handles[lang], = ax.plot(*zip(*points), marker="o", markersize=4, linewidth=1.3, color=colors[lang])
        if mean:
            handles["mean"], = ax.plot(*zip(*mean), marker="o", linewidth=3.2, color="black")
        if panel == "iterations":
            _integer_ticks(ax)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share in the prompt's language")
    order = sorted(k for k in handles if k != "mean") + (["mean"] if "mean" in handles else [])
    fig.legend([handles[k] for k in order], order, loc="outside right upper", title="language")
    return fig


def plot_silhouette(series: dict[str, list[tuple[int, float]]], hub_layer: int | None):
    colors = _colors(series)
    fig = _figure(7.0, 4.2)
    ax = fig.subplots()
    for label, points in series.items():
        style = {"linestyle": "--", "color": "dimgray"} if label == "hub scan" else {"color": colors[label]}
        ax.plot(*zip(*points), marker="o", markersize=4, linewidth=1.6, label=label, **style)
    if hub_layer is not None:
        ax.axvline(hub_layer, color="firebrick", linestyle=":", linewidth=1.5, label=f"hub layer {hub_layer}")
    ax.set_xlabel("layer (hidden_states index)")
    ax.set_ylabel("silhouette score")
    ax.set_title("silhouette of pooled states by layer")
    _integer_ticks(ax)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper")
    return fig


def plot_small_multiples(panels: dict[str, list[tuple[float, float]]], xlabel: str):
    """One panel per metric: y against x with markers."""
    fig = _figure(min(max(5.0, 4.0 * len(panels)), 12.0), 3.4)
    for ax, (metric, points) in zip(_grid(fig, len(panels)), panels.items()):
        ax.plot(*zip(*points), marker="o", linewidth=1.6)
        ax.set_title(TITLES.get(metric, metric))
        ax.set_xlabel(xlabel)
        _integer_ticks(ax)
        _plain_y(ax)
        ax.grid(alpha=0.3)
    return fig


def plot_scaling(panels: dict[str, dict[str, list[tuple[float, float]]]], xlabel: str, legend_title: str):
    """One panel per metric; one line per combination of the other axes."""
    labels = list(dict.fromkeys(label for series in panels.values() for label in series))
    colors = _colors(labels)
    # a marker per line, so lines with equal values stay visible; past 20 lines (tab20) the colours repeat but
    # never with the same marker
    markers = {label: "osD^vP*Xph"[(i + i // 20) % 10] for i, label in enumerate(labels)}
    ncols = math.ceil(len(panels) / math.ceil(len(panels) / 4))
    fig = _figure(3.4 * ncols + 1.6, 2.9 * math.ceil(len(panels) / ncols) + 0.3)
    handles = {}
    for ax, (metric, series) in zip(_grid(fig, len(panels), ncols), panels.items()):
        for label, points in series.items():
            handles[label], = ax.plot(*zip(*points), marker=markers[label], markersize=6, markerfacecolor="none",
                                      linewidth=1.6, color=colors[label])
        xs = sorted({x for points in series.values() for x, _ in points})
        if len(xs) > 2 and xs[0] > 0 and xs[-1] / xs[0] >= 20:  # e.g. 16, 64, 256, 1024 prompts
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(xs, [format_value(x) for x in xs])
        ax.set_title(TITLES.get(metric, metric))
        ax.set_xlabel(xlabel)
        _plain_y(ax)
        ax.grid(alpha=0.3)
    fig.legend([handles[k] for k in labels], labels, loc="outside right upper", title=legend_title or None)
    return fig


def plot_fidelity_by_run(shares: dict[str, dict[str, float]]):
    """Grouped bars (one group per run, one bar per language); a run x language heatmap past MAX_BAR_RUNS runs,
    where bars would be too thin to read."""
    langs = sorted({lang for v in shares.values() for lang in v})
    runs = list(shares)
    if len(runs) > MAX_BAR_RUNS:
        return _fidelity_heatmap(shares, runs, langs)
    colors = _colors(langs)
    width = 0.8 / len(langs)
    fig = _figure(min(16.0, max(6.0, 0.35 * len(runs) * len(langs) + 2.5)), 4.4)
    ax = fig.subplots()
    for j, lang in enumerate(langs):
        xs = [i - 0.4 + width * (j + 0.5) for i, run in enumerate(runs) if lang in shares[run]]
        ax.bar(xs, [shares[run][lang] for run in runs if lang in shares[run]], width=width, color=colors[lang],
               label=lang)
    rotate = len(runs) > 3
    ax.set_xticks(range(len(runs)), runs, rotation=25 if rotate else 0, ha="right" if rotate else "center")
    ax.set_ylabel("share in the prompt's language")
    ax.set_ylim(0, 1.05)
    ax.set_title("language fidelity at the final iteration")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside right upper", title="language")
    return fig


def _fidelity_heatmap(shares: dict[str, dict[str, float]], runs: list[str], langs: list[str]):
    import numpy as np

    matrix = np.array([[shares[run].get(lang, np.nan) for lang in langs] for run in runs])  # (runs, langs)
    fig = _figure(min(14.0, 0.7 * len(langs) + 0.08 * max(map(len, runs)) + 2.5), 0.24 * len(runs) + 1.4)
    ax = fig.subplots()
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(matrix):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if value > 0.6 else "white")
    ax.set_xticks(range(len(langs)), langs)
    ax.set_yticks(range(len(runs)), runs, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_title("language fidelity at the final iteration")
    fig.colorbar(image, ax=ax, label="share in the prompt's language", shrink=min(1.0, 12 / len(runs) + 0.3))
    return fig
