"""`lmtrain plot` and `lmtrain sweep-report`: PNG sizes, what the panels draw, the ranked table and CSV,
superseded trial lines, log axes, errors, and the real conf/plot.yaml and conf/sweep_report.yaml."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from matplotlib.image import imread

from lmtrain.reports import (
    Direction,
    PlotConfig,
    SweepReportConfig,
    build_curves_figure,
    build_objective_figure,
    compute_xscale,
    load_run_metrics,
    plot_run,
    run_plot,
    run_sweep_report,
    sweep_report,
)
from lmtrain_testing import compose


def write_metrics(run_dir: Path, max_steps: int = 200, val_every: int = 50) -> list[dict]:
    """Rows as JsonlLogger writes them: a train row every 10 steps, a separate val row every val_every."""
    rows = []
    for step in range(10, max_steps + 1, 10):
        lr = 3e-3 * min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * step / max_steps))
        rows.append({"step": step, "train/loss": 8.0 * math.exp(-step / 120) + 2.0, "opt/lr": lr,
                     "perf/step_s": 0.33, "perf/tokens_per_s": 6100.0 + step, "data/tokens_seen": step * 2048.0,
                     "opt/grad_norm": 1.5 * math.exp(-step / 300)})
        if step % val_every == 0:
            loss = 8.0 * math.exp(-step / 120) + 2.3
            rows.append({"step": step, "val/loss": loss, "val/ppl": math.exp(loss), "val/bpb": loss / math.log(2) / 4})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def image_shape(path: Path) -> tuple[int, ...]:
    return imread(path).shape  # (height, width, RGBA)


# ---------------------------------------------------------------------------------------- plot


def test_plot_run_writes_fixed_size_pngs_into_run_plots(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    write_metrics(run_dir)
    written = plot_run(run_dir)
    assert [p.name for p in written] == ["curves.png", "loss.png", "lr.png", "tokens_per_s.png", "grad_norm.png"]
    assert all(p.parent == run_dir / "plots" for p in written)
    assert image_shape(written[0]) == (800, 1200, 4)
    assert all(image_shape(p) == (400, 600, 4) for p in written[1:])


def test_curves_draw_train_and_val_loss_on_one_axis_and_lr_tokens_per_s(tmp_path):
    rows = write_metrics(tmp_path / "r", max_steps=200, val_every=50)
    fig = build_curves_figure(load_run_metrics(tmp_path / "r"))
    loss_ax, lr_ax, tps_ax, _ = fig.axes
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert set(lines) == {"train", "val"}
    assert list(lines["val"].get_xdata()) == [50, 100, 150, 200]
    assert list(lines["train"].get_xdata()) == list(range(10, 201, 10))
    assert list(lr_ax.get_lines()[0].get_ydata()) == [r["opt/lr"] for r in rows if "opt/lr" in r]
    assert tps_ax.get_lines()[0].get_ydata()[-1] == 6300.0


def test_plot_run_before_first_val_shows_train_loss_only(tmp_path):
    write_metrics(tmp_path / "r", max_steps=30, val_every=1000)
    loss_ax = build_curves_figure(load_run_metrics(tmp_path / "r")).axes[0]
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train"]


@pytest.mark.parametrize("case, message", [
    ("no_run_dir", "run directory"),
    ("no_metrics", "metrics.jsonl' does not exist"),
    ("empty_metrics", "nothing logged yet"),
])
def test_plot_run_errors_name_the_problem(tmp_path, case, message):
    run_dir = tmp_path / "runs" / "r1"
    if case != "no_run_dir":
        run_dir.mkdir(parents=True)
    if case == "empty_metrics":
        (run_dir / "metrics.jsonl").write_text("")
    error = ValueError if case == "empty_metrics" else FileNotFoundError
    with pytest.raises(error, match=message) as info:
        plot_run(run_dir)
    assert str(run_dir) in str(info.value)
    assert not (run_dir / "plots").exists()


# -------------------------------------------------------------------------------------- sweeps


def trial(number: int, lr: float, d_model: int, value: float | None, state: str = "COMPLETE",
          direction: str = "minimize") -> dict:
    return {"number": number, "params": {"optim.lr": lr, "model.d_model": d_model}, "value": value, "state": state,
            "run_dir": f"sweeps/lr/runs/trial-{number}", "metric": "val/loss", "direction": direction}


def write_trials(sweep_dir: Path, trials: list[dict]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "trials.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trials))


SWEEP = [
    trial(0, 1e-4, 64, 4.12),
    trial(1, 3e-3, 128, 3.05),
    trial(2, 3e-2, 64, None, state="FAIL"),
    trial(3, 1e-3, 256, 3.41),
    trial(4, 6e-4, 128, 3.90, state="PRUNED"),
    trial(5, 2e-3, 64, None, state="RUNNING"),
]


def test_sweep_report_ranks_best_first_marks_best_and_writes_csv(tmp_path, capsys):
    sweep_dir = tmp_path / "sweeps" / "lr"
    write_trials(sweep_dir, SWEEP)
    rows, written = sweep_report(sweep_dir)
    assert [r["number"] for r in rows] == [1, 3, 0, 2, 4, 5]  # completed by val/loss, then the rest by number
    assert [r["best"] for r in rows] == [True] + [False] * 5
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["#", "optim.lr", "model.d_model", "val/loss", "state", "run_dir"]
    assert table[1].split() == ["*", "1", "0.003", "128", "3.05", "COMPLETE", "sweeps/lr/runs/trial-1"]
    assert table[3].split()[0] == "0"  # no mark on any other row
    assert "best: trial 1, val/loss=3.05" in "\n".join(table)
    with open(sweep_dir / "report" / "trials.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [int(r["number"]) for r in csv_rows] == [1, 3, 0, 2, 4, 5]
    assert csv_rows[0]["optim.lr"] == "0.003" and csv_rows[0]["best"] == "True" and csv_rows[3]["val/loss"] == ""
    assert [p.name for p in written] == ["objective_vs_optim.lr.png", "objective_vs_model.d_model.png"]
    assert all(image_shape(p) == (600, 800, 4) for p in written)


def test_sweep_report_maximize_puts_the_highest_first(tmp_path, capsys):
    write_trials(tmp_path, [trial(n, 1e-3 * (n + 1), 64, value, direction="maximize")
                            for n, value in enumerate([0.41, 0.58, 0.50])])
    rows, _ = sweep_report(tmp_path)
    assert [r["number"] for r in rows] == [1, 2, 0] and rows[0]["best"]


def test_a_later_line_of_a_trial_supersedes_the_earlier(tmp_path, capsys):
    write_trials(tmp_path, [trial(0, 1e-3, 64, 3.5), trial(1, 3e-3, 64, None, state="RUNNING"),
                            trial(1, 3e-3, 64, 3.1)])
    rows, _ = sweep_report(tmp_path)
    assert len(rows) == 2
    assert rows[0] == {"number": 1, "params": {"optim.lr": 3e-3, "model.d_model": 64}, "value": 3.1,
                       "state": "COMPLETE", "run_dir": "sweeps/lr/runs/trial-1", "best": True, "reason": ""}


def test_a_parameter_spanning_more_than_10x_gets_a_log_axis():
    assert compute_xscale([1e-4, 3e-3, 1e-3]) == "log"
    assert compute_xscale([64, 128, 256, 512]) == "linear"  # 8x
    assert compute_xscale([0.0, 0.1, 0.2]) == "linear"  # not all positive
    assert compute_xscale(["rmsnorm", "layernorm"]) == "linear"
    lr_fig = build_objective_figure("optim.lr", [(1e-4, 4.1, False), (3e-3, 3.0, True)], metric="val/loss",
                                    direction=Direction.minimize, n_trials=2)
    width_fig = build_objective_figure("model.d_model", [(64, 4.1, False), (256, 3.0, True)], metric="val/loss",
                                       direction=Direction.minimize, n_trials=2)
    assert lr_fig.axes[0].get_xscale() == "log"
    assert width_fig.axes[0].get_xscale() == "linear"


def test_a_categorical_parameter_is_plotted_on_named_ticks(tmp_path, capsys):
    trials = [{**trial(i, 1e-3, 64, v), "params": {"model.norm": norm}} for i, (norm, v) in
              enumerate([("rmsnorm", 3.1), ("layernorm", 3.3), ("rmsnorm", 3.2)])]
    write_trials(tmp_path, trials)
    _, written = sweep_report(tmp_path)
    fig = build_objective_figure("model.norm", [("rmsnorm", 3.1, True), ("layernorm", 3.3, False)],
                                 metric="val/loss", direction=Direction.minimize, n_trials=2)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["layernorm", "rmsnorm"]
    assert image_shape(written[0]) == (600, 800, 4)


def test_no_completed_trial_prints_the_table_then_fails(tmp_path, capsys):
    write_trials(tmp_path, [trial(0, 1e-3, 64, None, state="RUNNING"), trial(1, 2e-3, 64, None, state="FAIL"),
                            trial(2, 4e-3, 64, float("nan"))])
    with pytest.raises(ValueError, match=r"no completed trial with a finite val/loss .*1 COMPLETE, 1 FAIL, 1 RUNNING"):
        sweep_report(tmp_path)
    out = capsys.readouterr().out
    assert "RUNNING" in out and "FAIL" in out and "*" not in out
    assert (tmp_path / "report" / "trials.csv").is_file()
    assert not list((tmp_path / "report").glob("*.png"))


def test_a_failed_trial_shows_its_reason_in_the_table_and_csv(tmp_path, capsys):
    reason = "exit 2: lmtrain: error: prepared dataset 'x' does not exist"
    write_trials(tmp_path, [trial(0, 1e-3, 64, 3.5), {**trial(1, 2e-3, 64, None, state="FAIL"), "reason": reason}])
    sweep_report(tmp_path)
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[-1] == "reason" and table[2].endswith(reason) and table[1].endswith("trial-0")
    with open(tmp_path / "report" / "trials.csv") as f:
        assert [r["reason"] for r in csv.DictReader(f)] == ["", reason]


def test_missing_trials_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="trials.jsonl' does not exist") as info:
        sweep_report(tmp_path / "sweeps" / "nope")
    assert str(tmp_path / "sweeps" / "nope" / "trials.jsonl") in str(info.value)


def test_a_rerun_removes_plots_of_parameters_no_longer_swept(tmp_path, capsys):
    write_trials(tmp_path, SWEEP)
    sweep_report(tmp_path)
    write_trials(tmp_path, [{**t, "params": {"optim.lr": t["params"]["optim.lr"]}} for t in SWEEP])
    sweep_report(tmp_path)
    assert sorted(p.name for p in (tmp_path / "report").glob("*.png")) == ["objective_vs_optim.lr.png"]


# ----------------------------------------------------------------------------- the real conf/


def test_conf_plot_and_sweep_report_compose_to_their_schemas(tmp_path, capsys):
    from lmtrain.config import to_typed

    run_dir = tmp_path / "r1"
    write_metrics(run_dir)
    plot_cfg = to_typed(compose("plot", [f"run={run_dir}", f"out={tmp_path / 'png'}"]))
    assert isinstance(plot_cfg, PlotConfig)
    assert run_plot(plot_cfg)[0] == tmp_path / "png" / "curves.png"  # out= replaces <run>/plots
    assert not (run_dir / "plots").exists()
    write_trials(tmp_path / "sweep", SWEEP)
    sweep_cfg = to_typed(compose("sweep_report", [f"sweep_dir={tmp_path / 'sweep'}"]))
    assert isinstance(sweep_cfg, SweepReportConfig)
    rows, _ = run_sweep_report(sweep_cfg)
    assert rows[0]["number"] == 1
