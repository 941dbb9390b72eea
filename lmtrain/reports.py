"""`lmtrain plot` and `lmtrain sweep-report`: PNG curves of one run; a ranked table, a CSV and
objective-vs-parameter plots of a sweep.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`), never pyplot: no
backend is selected, so importing this module leaves a notebook's backend alone, no GUI is
needed, and a figure is freed with its last reference (pyplot keeps every figure until closed).
`Figure.savefig` renders PNGs with Agg. Sizes are fixed and saved without bbox_inches="tight",
so every PNG has exactly the pixel size below.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lmtrain.loggers import read_metrics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100
CURVES_SIZE_IN = (12.0, 8.0)  # 1200 x 800 px: all panels of a run
PANEL_SIZE_IN = (6.0, 4.0)  # 600 x 400 px: one panel on its own
OBJECTIVE_SIZE_IN = (8.0, 6.0)  # 800 x 600 px: a sweep's objective against one parameter
LOG_AXIS_MIN_SPAN = 10.0
"""A positive numeric parameter whose largest value exceeds this times its smallest is drawn on a log axis."""


@dataclass
class PlotConfig:
    run: str = "???"
    """A run directory (runs/<run>) holding metrics.jsonl."""
    out: Optional[str] = None
    """Directory for the PNGs; None = <run>/plots."""


@dataclass
class SweepReportConfig:
    sweep_dir: str = "???"
    """A sweep directory (sweeps/<name>) holding trials.jsonl. Not `sweep`: that is the config group
    of `lmtrain sweep` (conf/sweep/), and Hydra reads `sweep=...` as a choice in that group."""


# ---------------------------------------------------------------------------------------- plot


@dataclass(frozen=True)
class Panel:
    name: str
    """File stem of the panel's own PNG."""
    title: str
    series: tuple[tuple[str, str], ...]
    """(metrics.jsonl key, legend label) of each line drawn on the panel."""


PANELS = (
    Panel("loss", "loss", (("train/loss", "train"), ("val/loss", "val"))),
    Panel("lr", "learning rate", (("opt/lr", "lr"),)),
    Panel("tokens_per_s", "throughput (tokens/s, all ranks)", (("perf/tokens_per_s", "tokens/s"),)),
    Panel("grad_norm", "gradient norm (before clipping)", (("opt/grad_norm", "grad norm"),)),
)


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write curves.png (every panel, 1200x800 px) and one 600x400 px PNG per panel of the run's
    metrics.jsonl into out_dir (default <run_dir>/plots); returns the paths written, curves.png first."""
    run_dir = Path(run_dir)
    rows = load_run_metrics(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_save(build_curves_figure(rows, title=run_dir.resolve().name), out_dir / "curves.png")]
    for panel in PANELS:
        fig = _new_figure(PANEL_SIZE_IN)
        _draw_panel(fig.add_subplot(), panel, rows)
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"{panel.name}.png"))
    return written


def load_run_metrics(run_dir: Path) -> list[dict]:
    """The rows of <run_dir>/metrics.jsonl, by step; errors say which file is missing or empty."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory '{run_dir}' does not exist; pass run=runs/<run>, a directory "
                                "'lmtrain train' made")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist; is '{run_dir}' a run directory of 'lmtrain train'?")
    try:
        rows = read_metrics(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"'{path}' has a line that is not JSON ({e}); a run killed mid-write can leave one: "
                         "delete that line") from e
    if not rows:
        raise ValueError(f"'{path}' is empty: nothing logged yet (the first row comes after "
                         "trainer.log_every_steps steps)")
    return rows


def compute_series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that logged key; train and val rows are separate rows."""
    points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def build_curves_figure(rows: list[dict], title: str = "") -> Figure:
    """A 2x2 grid of PANELS over a shared step axis."""
    fig = _new_figure(CURVES_SIZE_IN)
    axes = fig.subplots(2, 2, sharex=True).flatten()
    for ax, panel in zip(axes, PANELS):
        _draw_panel(ax, panel, rows)
    for ax in axes[:2]:
        ax.set_xlabel("")  # the x axis is shared: "step" once, under the bottom row
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _draw_panel(ax: Axes, panel: Panel, rows: list[dict]) -> None:
    drawn = 0
    for key, label in panel.series:
        steps, values = compute_series(rows, key)
        if steps:
            sparse = len(steps) < len(rows) / 4  # val rows: a few points, so mark each one
            ax.plot(steps, values, label=label, marker="o" if sparse else None, markersize=3)
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    elif len(panel.series) > 1:
        ax.legend()
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)


# ----------------------------------------------------------------------------------- sweep report


class Direction(Enum):
    minimize = "minimize"
    maximize = "maximize"


COMPLETE = "COMPLETE"


def sweep_report(sweep_dir: Path) -> tuple[list[dict], list[Path]]:
    """Print the trials of <sweep_dir>/trials.jsonl best first, write report/trials.csv and one
    report/objective_vs_<param>.png (800x600 px) per swept parameter.

    Rows: {"number", "params", "value", "state", "run_dir", "best", "reason"}, completed trials by objective
    (best first), then the others by number. Raises ValueError after printing and writing the CSV
    when no trial has completed."""
    sweep_dir = Path(sweep_dir)
    trials = load_trials(sweep_dir)
    metric, direction = compute_objective(trials)
    rows = compute_rows(trials, direction)
    params = compute_param_names(trials)
    report_dir = sweep_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    save_trials_csv(rows, params, metric, report_dir / "trials.csv")
    print(format_table(rows, params, metric), flush=True)
    for stale in report_dir.glob("objective_vs_*.png"):  # a parameter dropped from the sweep
        stale.unlink()
    completed = [r for r in rows if _ranked(r)]
    if not completed:
        states = ", ".join(f"{sum(r['state'] == s for r in rows)} {s}" for s in sorted({r["state"] for r in rows}))
        raise ValueError(f"no completed trial with a finite {metric} in '{sweep_dir / 'trials.jsonl'}' yet "
                         f"({states}); run the report again when one completes")
    best = completed[0]
    print(f"best: trial {best['number']}, {metric}={best['value']:.5g} ({direction.value}), {best['run_dir']}",
          flush=True)
    written = []
    for param in params:
        points = [(r["params"][param], r["value"], r["best"]) for r in completed if param in r["params"]]
        fig = build_objective_figure(param, points, metric=metric, direction=direction,
                                     n_trials=len(rows))
        written.append(_save(fig, report_dir / f"objective_vs_{_file_safe(param)}.png"))
    return rows, written


def load_trials(sweep_dir: Path) -> list[dict]:
    """The latest line of each trial number in <sweep_dir>/trials.jsonl, by number."""
    path = sweep_dir / "trials.jsonl"
    if not path.is_file():
        where = "" if sweep_dir.is_dir() else f" (the directory '{sweep_dir}' does not exist either)"
        raise FileNotFoundError(f"'{path}' does not exist{where}; pass sweep_dir=sweeps/<name>, a directory "
                                "'lmtrain sweep' writes")
    by_number: dict[int, dict] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            trial = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"'{path}' line {lineno} is not JSON ({e})") from e
        missing = [k for k in ("number", "params", "state") if k not in trial]
        if missing:
            raise ValueError(f"'{path}' line {lineno} lacks {', '.join(missing)}: {line[:200]}")
        by_number[int(trial["number"])] = trial  # a later line (the trial finished) supersedes an earlier one
    if not by_number:
        raise ValueError(f"'{path}' is empty: no trial has started yet")
    return [by_number[n] for n in sorted(by_number)]


def compute_objective(trials: list[dict]) -> tuple[str, Direction]:
    """The sweep's metric name and direction; every trial must agree."""
    metrics = {t.get("metric", "objective") for t in trials}
    directions = {t.get("direction", "minimize") for t in trials}
    if len(metrics) > 1 or len(directions) > 1:
        raise ValueError(f"trials disagree on the objective: metrics {sorted(metrics)}, directions "
                         f"{sorted(directions)}; one trials.jsonl must hold one sweep")
    metric, direction = metrics.pop(), directions.pop()
    try:
        return metric, Direction[direction]
    except KeyError:
        raise ValueError(f"direction={direction!r} in trials.jsonl is not one of minimize, maximize") from None


def compute_rows(trials: list[dict], direction: Direction) -> list[dict]:
    """Completed trials with a finite value by objective (best first, ties by number), then the rest by number."""
    match direction:
        case Direction.minimize:
            sign = 1.0
        case Direction.maximize:
            sign = -1.0
        case _:
            raise ValueError(f"unknown direction {direction}")
    rows = [{"number": int(t["number"]), "params": dict(t["params"]), "value": _as_float(t.get("value")),
             "state": str(t["state"]), "run_dir": t.get("run_dir") or "", "best": False,
             "reason": t.get("reason") or ""} for t in trials]
    rows.sort(key=lambda r: (0, sign * r["value"], r["number"]) if _ranked(r) else (1, 0.0, r["number"]))
    if rows and _ranked(rows[0]):
        rows[0]["best"] = True
    return rows


def compute_param_names(trials: list[dict]) -> list[str]:
    """Every parameter any trial set, in order of first appearance (a conditional one may be absent in some)."""
    return list(dict.fromkeys(name for t in trials for name in t["params"]))


def compute_xscale(values: list) -> str:
    """'log' for numbers that are all positive and span more than LOG_AXIS_MIN_SPAN, else 'linear'."""
    if not values or not all(_is_number(v) for v in values):
        return "linear"
    low, high = min(values), max(values)
    return "log" if low > 0 and high > LOG_AXIS_MIN_SPAN * low else "linear"


def build_objective_figure(param: str, points: list[tuple], *, metric: str, direction: Direction,
                           n_trials: int) -> Figure:
    """Scatter of the objective against one parameter; points are (param value, objective, is best).
    Non-numeric values (a choice of norm, a flag) are placed on a categorical axis."""
    fig = _new_figure(OBJECTIVE_SIZE_IN)
    ax = fig.add_subplot()
    xs_raw = [x for x, _, _ in points]
    ax.set_xscale(compute_xscale(xs_raw))  # first: setting a scale resets the ticks set below
    if all(_is_number(x) for x in xs_raw):
        xs = [float(x) for x in xs_raw]
    else:
        categories = sorted({str(x) for x in xs_raw})
        xs = [float(categories.index(str(x))) for x in xs_raw]
        ax.set_xticks(range(len(categories)), categories)
    ys = [y for _, y, _ in points]
    ax.scatter(xs, ys, color="tab:blue", alpha=0.8, label="complete trial")
    best = [(x, y) for x, (_, y, is_best) in zip(xs, points) if is_best]
    if best:
        ax.scatter(*zip(*best), marker="*", s=250, color="tab:red", zorder=3, label="best")
    ax.set_xlabel(param)
    ax.set_ylabel(f"{metric} ({direction.value})")
    ax.set_title(f"{metric} vs {param} ({len(points)} complete of {n_trials} trials)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def format_table(rows: list[dict], params: list[str], metric: str) -> str:
    """Fixed-width text table; '*' marks the best trial; a reason column when a trial failed."""
    reasons = any(r["reason"] for r in rows)
    header = ["", "#", *params, metric, "state", "run_dir", *(["reason"] if reasons else [])]
    body = [["*" if r["best"] else "", str(r["number"]),
             *(_format_value(r["params"][p]) if p in r["params"] else "-" for p in params),
             "-" if r["value"] is None else f"{r['value']:.5g}", r["state"], r["run_dir"],
             *([r["reason"]] if reasons else [])] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body])


def save_trials_csv(rows: list[dict], params: list[str], metric: str, path: Path) -> None:
    """One line per trial in table order; an absent parameter or objective is an empty cell."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", *params, metric, "state", "run_dir", "best", "reason"])
        for r in rows:
            writer.writerow([r["number"], *(r["params"].get(p, "") for p in params),
                             "" if r["value"] is None else r["value"], r["state"], r["run_dir"], r["best"], r["reason"]])


# ------------------------------------------------------------------------------------------ CLI


def run_plot(cfg: PlotConfig) -> list[Path]:
    written = plot_run(Path(cfg.run), Path(cfg.out) if cfg.out else None)
    print(f"wrote {len(written)} plots to {written[0].parent}: {', '.join(p.name for p in written)}", flush=True)
    return written


def run_sweep_report(cfg: SweepReportConfig) -> tuple[list[dict], list[Path]]:
    rows, written = sweep_report(Path(cfg.sweep_dir))
    report_dir = Path(cfg.sweep_dir) / "report"
    print(f"wrote {report_dir / 'trials.csv'} and {len(written)} plots to {report_dir}", flush=True)
    return rows, written


# -------------------------------------------------------------------------------------- helpers


def _new_figure(size_in: tuple[float, float]) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError as e:  # matplotlib is only in the dev extra
        raise ImportError("lmtrain plot and lmtrain sweep-report need matplotlib: pip install 'matplotlib>=3.8'") from e
    return Figure(figsize=size_in, dpi=DPI)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _ranked(row: dict) -> bool:
    return row["state"] == COMPLETE and row["value"] is not None and math.isfinite(row["value"])


def _as_float(value) -> float | None:
    return None if value is None else float(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _format_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)
