"""Plots and display tables of fedke results (matplotlib; works headless under Agg).

Every plot function draws on ``ax`` when given one (so figures can have several panels) and
otherwise on a new figure, and returns the :class:`~matplotlib.figure.Figure`. Nothing is shown
or saved here: call ``fig.savefig(...)`` yourself; in a notebook the figure displays itself.

Inputs are the tidy long tables fedke writes — one row per (round, method, request set, metric)
(``ResultsWriter.table()``, ``results.csv``) — or the frame of :func:`fedke.simulations.inprocess.sweep_clients`,
which adds ``n_clients`` and ``edits_per_client``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd

# The order people read the metrics in (as fedke.simulations.results.METRIC_ORDER; repeated
# here so plotting does not import Flower).
METRIC_ORDER = ["ES", "PS", "NS", "Score", "EA", "PA", "NA", "AccScore"]
# The order and look of the methods: the lossless merges first, then the destructive baselines.
METHOD_ORDER = ["GlobalEdit", "CollabEdit", "CollabEdit (one-shot)", "FedAvg", "TaskArithmetic", "TIES", "Unedited"]
METHOD_STYLE = {
    "GlobalEdit": {"color": "black", "marker": "s", "linestyle": ":"},
    "CollabEdit": {"color": "tab:blue", "marker": "o", "linestyle": "-"},
    "FedAvg": {"color": "tab:orange", "marker": "v", "linestyle": "-"},
    "TaskArithmetic": {"color": "tab:green", "marker": "^", "linestyle": "-"},
    "TIES": {"color": "tab:red", "marker": "D", "linestyle": "-"},
    "Unedited": {"color": "tab:gray", "marker": "x", "linestyle": "--"},
}


def _ordered(names: Iterable[str], order: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    return [n for n in order if n in names] + sorted(n for n in names if n not in order)


def _line_look(method: str, i: int) -> dict:
    """The method's colour and marker; later lines get smaller markers drawn on top, so methods
    with equal values (e.g. several at 0) stay visible."""
    return {"marker": "o", **METHOD_STYLE.get(method, {}), "markersize": max(4.0, 8.5 - 1.2 * i), "zorder": 2 + i}


def _axes(ax, figsize=(6.4, 4.2)):
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt  # pyplot so that notebooks display the figure inline

    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} needs columns {list(columns)}; missing {missing} (has {list(frame.columns)})")


def _percent_axis(ax, values: pd.Series) -> None:
    """Metrics are percentages: show 0..100 unless the data leave that range."""
    if len(values) and values.min() >= 0 and values.max() <= 100:
        ax.set_ylim(-2, 102)


def plot_score_vs_clients(df: pd.DataFrame, *, metric: str = "Score", ax=None, title: str | None = None):
    """``metric`` against the number of clients N, one line per method (CollabEdit paper, Figure 6).

    ``df`` is the tidy frame of ``sweep_clients`` (``n_clients, method, metric, value``, ...).
    Several rows per (N, method) — e.g. several rounds — are averaged. The x axis is logarithmic,
    ticked at the swept N.
    """
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    _require(df, ["n_clients", "method", "metric", "value"], "plot_score_vs_clients")
    rows = df[df["metric"] == metric]
    if rows.empty:
        raise ValueError(f"no rows with metric {metric!r}; metrics present: {sorted(df['metric'].unique())}")
    fig, ax = _axes(ax)
    points = rows.groupby(["method", "n_clients"], as_index=False)["value"].mean()
    for i, method in enumerate(_ordered(points["method"], METHOD_ORDER)):
        line = points[points["method"] == method].sort_values("n_clients")
        ax.plot(line["n_clients"], line["value"], label=method, linewidth=1.8, **_line_look(method, i))
    counts = sorted(points["n_clients"].unique())
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(counts))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    if len(counts) > 1:
        ax.set_xlim(counts[0] / 1.25, counts[-1] * 1.25)
    _percent_axis(ax, points["value"])
    ax.set_xlabel("number of clients N (log scale)")
    ax.set_ylabel(metric)
    ax.set_title(title if title is not None else f"{metric} vs number of clients")
    ax.grid(True, alpha=0.3)
    ax.legend(title="method", fontsize="small")
    return fig


def plot_metric_over_rounds(table: pd.DataFrame, *, metric: str = "Score", request_set: str | Sequence[str] | None = "all",
                            ax=None, title: str | None = None):
    """``metric`` against the round, one line per method (and per request set when several).

    ``table`` is a long result table (``round, method, request_set, metric, value``).
    ``request_set`` picks the set(s) of requests the metric was measured on: one name (default
    ``"all"``), several, or ``None`` for every set present — e.g. the requests of round 1
    measured after every later round shows forgetting.
    """
    from matplotlib.ticker import MaxNLocator

    _require(table, ["round", "method", "request_set", "metric", "value"], "plot_metric_over_rounds")
    rows = table[table["metric"] == metric]
    if request_set is not None:
        wanted = [request_set] if isinstance(request_set, str) else list(request_set)
        rows = rows[rows["request_set"].isin(wanted)]
    if rows.empty:
        raise ValueError(f"no rows with metric {metric!r} and request_set {request_set!r}; "
                         f"present: metrics {sorted(table['metric'].unique())}, "
                         f"request sets {sorted(table['request_set'].unique())}")
    fig, ax = _axes(ax)
    points = rows.groupby(["method", "request_set", "round"], as_index=False)["value"].mean()
    sets = _ordered(points["request_set"], ["all"])
    dashes = ["-", "--", ":", "-."]
    for j, method in enumerate(_ordered(points["method"], METHOD_ORDER)):
        style = _line_look(method, j)
        for i, name in enumerate(sets):
            line = points[(points["method"] == method) & (points["request_set"] == name)].sort_values("round")
            if line.empty:
                continue
            if len(sets) > 1:
                style["linestyle"] = dashes[i % len(dashes)]
            label = method if len(sets) == 1 else f"{method} · {name}"
            ax.plot(line["round"], line["value"], label=label, linewidth=1.8, **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _percent_axis(ax, points["value"])
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    where = f" on {sets[0]!r} requests" if len(sets) == 1 else ""
    ax.set_title(title if title is not None else f"{metric} over rounds{where}")
    ax.grid(True, alpha=0.3)
    ax.legend(title="method" if len(sets) == 1 else "method · request set", fontsize="small")
    return fig


def table1_frame(summary_df: pd.DataFrame, *, decimals: int = 2, request_set: str = "all") -> pd.DataFrame:
    """The Table 1 view: one row per method (in reading order), metric columns, rounded.

    Takes the wide ``summary`` of a run or comparison (index = method, columns = metrics) or a
    tidy long table (``method, metric, value`` and optionally ``round`` / ``request_set``; the
    last round per method on ``request_set`` is shown).
    """
    frame = summary_df
    if {"metric", "value", "method"} <= set(frame.columns):
        if "request_set" in frame.columns:
            frame = frame[frame["request_set"] == request_set]
        if "round" in frame.columns and not frame.empty:
            frame = frame[frame["round"] == frame.groupby("method")["round"].transform("max")]
        frame = frame.pivot_table(index="method", columns="metric", values="value", aggfunc="last")
    frame = frame.copy()
    frame.index.name = "method"
    frame.columns.name = None
    columns = _ordered(frame.columns, METRIC_ORDER)
    rows = _ordered(frame.index, METHOD_ORDER)
    return frame.loc[rows, columns].astype(float).round(decimals)


# Run-config strategy names -> the display names above (results of fedke runs use the former).
METHOD_NAMES = {"collabedit": "CollabEdit", "global": "GlobalEdit", "fedavg": "FedAvg",
                "task_arithmetic": "TaskArithmetic", "ties": "TIES"}
COVARIANCE_LINESTYLE = {"immutable": "-", "dynamic": "--"}


def plot_forgetting(table: pd.DataFrame, *, metrics: Sequence[str] = ("ES", "PS", "Score", "EA", "AccScore"),
                    request_set: str = "old", axes=None, title: str | None = None):
    """Knowledge forgetting (CollabEdit section 4.2.3, Table 5): old-edit metrics against the round.

    One panel per metric; one line per method (its colour) and covariance (solid: immutable C,
    dashed: dynamic C). ``table`` is a long result table (``round, method, request_set, metric,
    value``), e.g. several :func:`fedke.simulations.multiround.run_multiround` tables concatenated;
    a ``covariance`` column (``immutable`` / ``dynamic``) separates the two settings, and without
    one every row counts as one setting. Method names of the run config (``collabedit``) are shown
    by their display names (``CollabEdit``). ``axes`` (one per metric) draws on given axes.
    """
    from matplotlib.ticker import MaxNLocator

    _require(table, ["round", "method", "request_set", "metric", "value"], "plot_forgetting")
    metrics = list(metrics)
    if not metrics:
        raise ValueError("metrics is empty: name at least one metric to plot")
    frame = table[table["request_set"] == request_set].copy()
    if frame.empty:
        raise ValueError(f"no rows for request_set {request_set!r}; present: {sorted(table['request_set'].unique())}")
    missing = [m for m in metrics if m not in set(frame["metric"])]
    if missing:
        raise ValueError(f"no rows with metric(s) {missing} on {request_set!r}; present: {sorted(frame['metric'].unique())}")
    frame["method"] = frame["method"].map(lambda m: METHOD_NAMES.get(m, m))
    if "covariance" not in frame.columns:
        frame["covariance"] = ""
    if axes is None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.6), layout="constrained",
                                 squeeze=False)
        axes = list(axes[0])
    else:
        axes = list(axes)
        if len(axes) != len(metrics):
            raise ValueError(f"got {len(axes)} axes for {len(metrics)} metrics")
        fig = axes[0].figure
    points = frame.groupby(["method", "covariance", "metric", "round"], as_index=False)["value"].mean()
    settings = _ordered(points["covariance"], list(COVARIANCE_LINESTYLE))
    for ax, metric in zip(axes, metrics):
        rows = points[points["metric"] == metric]
        for i, method in enumerate(_ordered(rows["method"], METHOD_ORDER)):
            for setting in settings:
                line = rows[(rows["method"] == method) & (rows["covariance"] == setting)].sort_values("round")
                if line.empty:
                    continue
                style = {**_line_look(method, i), "linestyle": COVARIANCE_LINESTYLE.get(setting, "-")}
                style["markersize"] = min(style["markersize"], 5.0) if len(line) < 30 else 0.0
                label = f"{method} · {setting} C" if setting else method
                ax.plot(line["round"], line["value"], label=label, linewidth=1.6, **style)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _percent_axis(ax, rows["value"])
        ax.set_xlabel("round")
        ax.set_ylabel(f"{metric} of the {request_set!r} edits")
        ax.set_title(metric)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(title if title is not None else f"Forgetting: the {request_set!r} edits over rounds")
    return fig


def plot_overlap(result: dict, *, ax=None, title: str | None = None):
    """Knowledge overlap (CollabEdit Figure 3): ``||R||_F`` after the same edits are merged k times.

    ``result`` is what ``bench/overlap.py`` writes: ``repeats`` and, per editor mode,
    ``figure3_modes[mode]["residual_norm"]`` (one value per repeat). One line per mode, log scale
    (eq. 6 predicts a geometric fall)."""
    if "repeats" not in result or not result.get("figure3_modes"):
        raise ValueError(f"plot_overlap needs 'repeats' and 'figure3_modes' (bench/overlap.py's output); got {sorted(result)}")
    fig, ax = _axes(ax)
    repeats = list(result["repeats"])
    for i, (mode, curve) in enumerate(result["figure3_modes"].items()):
        norms = list(curve["residual_norm"])
        if len(norms) != len(repeats):
            raise ValueError(f"mode {mode!r} has {len(norms)} residual norms for {len(repeats)} repeats")
        ax.plot(repeats, norms, marker="os^"[i % 3], label=f"{mode} MEMIT", linewidth=1.6)
    ax.set_yscale("log")
    ax.set_xlabel("times the same edits were merged (k)")
    ax.set_ylabel("||R||_F at the last edited layer")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize="small")
    ax.set_title(title if title is not None else "Overlap: the residual of repeated edits")
    return fig


def plot_conflict(result: dict, *, axes=None, title: str | None = None):
    """Knowledge conflict (CollabEdit Tables 4 and 6): before and after resolution.

    ``result`` is what ``bench/conflict.py`` writes. Left: ``table4`` (Succ, Avg-dP of the winning
    objects on their prompts, x100); right: the winners' ES / PS / NS / Score (``winners``)."""
    for key in ("table4", "winners"):
        if key not in result or not {"before", "after"} <= set(result[key]):
            raise ValueError(f"plot_conflict needs {key!r} with 'before' and 'after' (bench/conflict.py's output)")
    if axes is None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    else:
        fig = axes[0].figure
    panels = [(axes[0], result["table4"], ["succ", "avg_delta_p"], "winning object on its prompts"),
              (axes[1], result["winners"], ["ES", "PS", "NS", "Score"], "the winners' edits")]
    for ax, table, metrics, what in panels:
        x = np.arange(len(metrics))
        for offset, stage in ((-0.2, "before"), (0.2, "after")):
            ax.bar(x + offset, [table[stage][m] for m in metrics], width=0.4, label=f"{stage} resolution")
        ax.set_xticks(x, ["Succ" if m == "succ" else "Avg-ΔP" if m == "avg_delta_p" else m for m in metrics])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(what)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(title if title is not None else "Conflict: same subject and relation, two new objects")
    return fig
