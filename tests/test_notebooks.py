"""The notebooks run headless on the tiny world, and the plots they use draw what they should."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from fedke.plots import plot_metric_over_rounds, plot_score_vs_clients, table1_frame  # noqa: E402

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
METHODS = {"CollabEdit", "FedAvg", "TaskArithmetic", "TIES"}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---------------------------------------------------------------------- plots
def _sweep_frame() -> pd.DataFrame:
    rows = []
    for n in (1, 2, 5, 10):
        for method, score in {"CollabEdit": 90.0, "FedAvg": 90.0 / n, "TIES": 80.0 - n}.items():
            for metric, value in {"ES": score + 5, "Score": score}.items():
                rows.append({"round": 1, "method": method, "request_set": "all", "metric": metric,
                             "value": value, "n_clients": n, "edits_per_client": 20 // n})
    return pd.DataFrame(rows)


def test_plot_score_vs_clients_draws_one_line_per_method():
    frame = _sweep_frame()
    fig = plot_score_vs_clients(frame)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 3
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["CollabEdit", "FedAvg", "TIES"]
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "Score"
    fedavg = next(line for line in ax.get_lines() if line.get_label() == "FedAvg")
    assert list(fedavg.get_xdata()) == [1, 2, 5, 10] and list(fedavg.get_ydata()) == [90.0, 45.0, 18.0, 9.0]
    # on a given axes, another metric
    fig2, axes = plt.subplots(1, 2)
    assert plot_score_vs_clients(frame, metric="ES", ax=axes[1]) is fig2
    assert len(axes[1].get_lines()) == 3 and not axes[0].get_lines()
    with pytest.raises(ValueError, match="no rows with metric 'NS'"):
        plot_score_vs_clients(frame, metric="NS")


def test_plot_metric_over_rounds_and_table1_frame():
    rows = [{"round": r, "method": m, "request_set": s, "metric": "Score", "value": v - 5 * r}
            for r in (1, 2, 3) for m, v in (("CollabEdit", 95.0), ("FedAvg", 60.0))
            for s in ("all", "round-1")]
    table = pd.DataFrame(rows)
    fig = plot_metric_over_rounds(table)
    assert len(fig.axes[0].get_lines()) == 2
    fig = plot_metric_over_rounds(table, request_set=None)
    assert len(fig.axes[0].get_lines()) == 4

    summary = pd.DataFrame({"Score": [50.123, 99.456], "ES": [60.0, 100.0], "PS": [1 / 3, 2 / 3]},
                           index=pd.Index(["FedAvg", "CollabEdit"], name="method"))
    shown = table1_frame(summary)
    assert list(shown.index) == ["CollabEdit", "FedAvg"] and list(shown.columns) == ["ES", "PS", "Score"]
    assert shown.loc["CollabEdit", "Score"] == 99.46 and shown.loc["FedAvg", "PS"] == 0.33
    # the same from the long table: the last round on the "all" requests
    long = table1_frame(table)
    assert long.loc["CollabEdit", "Score"] == 80.0 and list(long.index) == ["CollabEdit", "FedAvg"]


# ---------------------------------------------------------------------- notebooks
def _run_notebook(path: Path, overrides: str, cwd: Path, env: dict[str, str]):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), \
        f"{path.name} is committed with outputs: clear them"
    first = nb.cells[0]
    assert first.cell_type == "code" and "parameters" in first.metadata.get("tags", [])
    nb.cells.insert(1, nbformat.v4.new_code_cell(overrides, metadata={"tags": ["injected-parameters"]}))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)  # raises CellExecutionError, naming the cell, if a cell fails
    return nb


def _outputs_text(nb) -> str:
    return "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.outputs if out.output_type == "stream")


def _cache_entries(cache_dir: Path) -> list[str]:
    """The world models and statistics in a fedke cache, by key."""
    return sorted(str(p.relative_to(cache_dir)) for pattern in ("world-models/*", "stats/*/*")
                  for p in cache_dir.glob(pattern))


@pytest.mark.slow
def test_client_sweep_notebook_runs_on_the_tiny_world(cache_dir, tiny_bed, tmp_path):
    out = tmp_path / "client-sweep"
    # N = 200 cannot run in either sweep (more clients than TOTAL_EDITS; 400 edits > 360 facts):
    # the notebook must skip it with a note instead of failing.
    overrides = "\n".join([
        "CLIENT_COUNTS = [1, 2, 3, 200]",
        "TOTAL_EDITS = 6",
        "EDITS_PER_CLIENT = 2",
        'PRESET = "tiny"',
        f"OVERRIDES = {{'cache_dir': {str(cache_dir)!r}}}",
        f"OUTPUT_DIR = {str(out)!r}",
    ])
    env = {**os.environ, "FEDKE_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    cached = _cache_entries(cache_dir)
    nb = _run_notebook(NOTEBOOKS / "client_sweep.ipynb", overrides, tmp_path, env)
    # the kernel found tiny_bed's model and statistics: it trained and computed nothing new
    assert _cache_entries(cache_dir) == cached

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = _outputs_text(nb)
    assert "sweep A: skipping N = 200" in text and "sweep B: skipping N = 200" in text

    for name in ("sweep_fixed_total", "sweep_fixed_per_client"):
        table = pd.read_csv(out / f"{name}.csv")
        metrics = set(table.metric)
        assert {"ES", "PS", "NS", "Score"} <= metrics
        assert set(table.n_clients) == {1, 2, 3} and set(table.method) == METHODS
        assert not table.duplicated(["n_clients", "method", "metric"]).any()
        assert len(table) == 3 * len(METHODS) * len(metrics)
        scores = table[table.metric != "n_cases"]
        assert scores.value.between(0, 100).all()
        cases = table[table.metric == "n_cases"]
        assert (cases.value == cases.n_clients * cases.edits_per_client).all()
    fixed_total = pd.read_csv(out / "sweep_fixed_total.csv")
    assert set(fixed_total.total_edits) == {6}
    assert set(pd.read_csv(out / "sweep_fixed_per_client.csv").edits_per_client) == {2}
    for name in ("score_vs_clients_fixed_total", "score_vs_clients_fixed_per_client"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_forgetting_draws_one_line_per_method_and_covariance():
    from fedke.plots import plot_forgetting

    rows = [{"round": r, "method": m, "request_set": s, "metric": metric, "value": 90.0 - drop * r,
             "covariance": cov}
            for r in (1, 2, 3)
            for m, cov, drop in (("collabedit", "immutable", 5.0), ("collabedit", "dynamic", 1.0),
                                 ("fedavg", "immutable", 9.0))
            for s in ("old", "new-1")
            for metric in ("ES", "PS", "Score", "EA", "AccScore")]
    table = pd.DataFrame(rows)
    fig = plot_forgetting(table)
    assert len(fig.axes) == 5 and [ax.get_title() for ax in fig.axes] == ["ES", "PS", "Score", "EA", "AccScore"]
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["CollabEdit · immutable C", "CollabEdit · dynamic C",
                                                    "FedAvg · immutable C"]
    assert [line.get_linestyle() for line in lines] == ["-", "--", "-"]
    assert list(lines[1].get_ydata()) == [89.0, 88.0, 87.0]
    # without a covariance column: one line per method; on given axes
    fig2, axes = plt.subplots(1, 2)
    assert plot_forgetting(table.drop(columns="covariance")[table.covariance == "immutable"], metrics=["ES", "EA"],
                           axes=axes) is fig2
    assert [line.get_label() for line in axes[1].get_lines()] == ["CollabEdit", "FedAvg"]
    with pytest.raises(ValueError, match="no rows for request_set 'new-9'"):
        plot_forgetting(table, request_set="new-9")
    with pytest.raises(ValueError, match=r"no rows with metric\(s\) \['NS'\]"):
        plot_forgetting(table, metrics=["NS"])


@pytest.mark.slow
def test_forgetting_notebook_runs_on_the_tiny_world(cache_dir, tiny_bed, tmp_path):
    out = tmp_path / "forgetting"
    overrides = "\n".join([
        "ROUNDS = 3",
        "CLIENTS = 2",
        "EDITS_PER_CLIENT = 2",
        'METHODS = ["collabedit", "fedavg"]',
        'DYNAMIC_METHODS = ["collabedit"]',
        'PRESET = "tiny"',
        f"OVERRIDES = {{'cache_dir': {str(cache_dir)!r}}}",
        f"OUTPUT_DIR = {str(out)!r}",
    ])
    env = {**os.environ, "FEDKE_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    cached = _cache_entries(cache_dir)
    nb = _run_notebook(NOTEBOOKS / "forgetting.ipynb", overrides, tmp_path, env)
    assert _cache_entries(cache_dir) == cached
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors

    table = pd.read_csv(out / "forgetting.csv", keep_default_na=False)
    runs = set(zip(table.method, table.covariance))
    assert runs == {("collabedit", "immutable"), ("collabedit", "dynamic"), ("fedavg", "immutable")}
    old = table[(table.request_set == "old") & (table.metric == "Score")]
    assert sorted(old.groupby(["method", "covariance"])["round"].apply(list).map(tuple).unique()) == [(1, 2, 3)]
    assert pd.to_numeric(old.value).between(0, 100).all()
    assert set(table[table["round"] == 3].request_set) >= {"old", "new-1", "new-2", "new-all", "merge"}
    for run in ("collabedit-immutable", "collabedit-dynamic", "fedavg-immutable"):
        assert (out / run / "results.csv").exists()
    png = out / "forgetting.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_overlap_and_conflict_draw_what_the_benchmarks_write():
    from fedke.plots import plot_conflict, plot_overlap

    overlap = {"repeats": [1, 2, 3], "figure3_modes": {"sequential": {"residual_norm": [4.0, 2.0, 1.0]},
                                                      "decoupled": {"residual_norm": [4.0, 3.0, 2.5]}}}
    fig = plot_overlap(overlap)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2 and list(lines[0].get_ydata()) == [4.0, 2.0, 1.0] and fig.axes[0].get_yscale() == "log"
    with pytest.raises(ValueError, match="figure3_modes"):
        plot_overlap({"repeats": [1]})
    with pytest.raises(ValueError, match="2 residual norms for 3 repeats"):
        plot_overlap({"repeats": [1, 2, 3], "figure3_modes": {"sequential": {"residual_norm": [1.0, 0.5]}}})
    stage = {"succ": 25.0, "avg_delta_p": -1.0, "ES": 50.0, "PS": 40.0, "NS": 90.0, "Score": 55.0}
    conflict = {"table4": {"before": stage, "after": {**stage, "succ": 90.0}},
                "winners": {"before": stage, "after": {**stage, "ES": 95.0}}}
    fig = plot_conflict(conflict)
    heights = [[bar.get_height() for bar in container] for container in fig.axes[0].containers]
    assert heights == [[25.0, -1.0], [90.0, -1.0]]
    assert [bar.get_height() for bar in fig.axes[1].containers[1]] == [95.0, 40.0, 90.0, 55.0]
    with pytest.raises(ValueError, match="table4"):
        plot_conflict({"winners": conflict["winners"]})


@pytest.mark.slow
def test_overlap_conflict_notebook_runs_on_the_tiny_world(cache_dir, tiny_bed, tmp_path):
    import json

    out = tmp_path / "oc"
    overrides = "\n".join(["QUICK = True", f"CACHE_DIR = {str(cache_dir)!r}", f"OUTPUT_DIR = {str(out)!r}"])
    env = {**os.environ, "FEDKE_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    nb = _run_notebook(NOTEBOOKS / "overlap_conflict.ipynb", overrides, NOTEBOOKS, env)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert {p.name for p in out.iterdir()} >= {"overlap.json", "overlap.png", "conflict.json", "conflict.png"}
    assert json.loads((out / "conflict.json").read_text())["detection"]["recall"] == 1.0
