"""What a finished sweep leaves behind: a results table (CSV and markdown) sorted by AP, a plot of AP against each
searched hyperparameter, and the best trial's configuration as a file `ddetr train --config FILE` reads.

A trial's AP is the best `val/AP` over its epochs (Ray Train keeps that epoch's checkpoint); "epochs" is how far it
trained, fewer than `train.epochs` when ASHA stopped it.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from ddetr.config import Config
from ddetr.io import atomic_write, join, save_figure
from ddetr.sweep.space import searched_values, trial_config

METRIC = "val/AP"


def trial_rows(results: Any, space: dict[str, dict[str, list]], max_epochs: int) -> list[dict[str, Any]]:
    """One row per trial of a Tune `ResultGrid`, best AP first (trials without an AP last).

    Row keys: "trial", "AP" (best val/AP), "AP50" (at that epoch), "epochs", "status" ("finished", "stopped"
    by the scheduler, "error"), "train/loss" (last epoch), then each searched key, and "config" (the trial's
    sampled config dict).
    """
    rows = []
    for result in results:
        history = result.metrics_dataframe
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        best: dict[str, Any] = {}
        if history is not None and METRIC in history and history[METRIC].notna().any():
            best = history.loc[history[METRIC].idxmax()].to_dict()
        epochs = int(history["epoch"].max()) if history is not None and "epoch" in history else 0
        if result.error is not None:
            status = "error"
        else:
            status = "finished" if epochs >= max_epochs else "stopped"
        row = {
            "trial": trial_id,
            "AP": _num(best.get(METRIC)),
            "AP50": _num(best.get("val/AP50")),
            "epochs": epochs,
            "status": status,
            "train/loss": _num(metrics.get("train/loss")),
        }
        row.update(searched_values(result.config, space))
        row["config"] = result.config
        rows.append(row)
    return sorted(rows, key=lambda r: (math.isnan(r["AP"]), -r["AP"] if not math.isnan(r["AP"]) else 0, r["trial"]))


def write_table(rows: list[dict[str, Any]], out_dir: str | Path) -> tuple[str, str]:
    """results.csv and results.md in `out_dir` (a folder or a URI); returns their paths."""
    columns = [c for c in rows[0] if c != "config"] if rows else ["trial", "AP"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = _write_atomic(join(str(out_dir), "results.csv"), buf.getvalue())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    md_path = _write_atomic(join(str(out_dir), "results.md"), "\n".join(lines) + "\n")
    return csv_path, md_path


def plot_ap(rows: list[dict[str, Any]], space: dict[str, dict[str, list]], path: str | Path) -> str | Path:
    """One panel per searched key: each trial's AP against its value (hollow markers: stopped early)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    keys = list(space)
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(3.2 * max(len(keys), 1), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        ((kind, args),) = space[key].items()
        values = [r[key] for r in rows]
        numeric = kind in ("uniform", "loguniform", "randint", "quniform") or all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        )
        if numeric:
            xs = [float(v) for v in values]
        else:
            labels = [str(v) for v in args] if kind in ("choice", "grid") else sorted({str(v) for v in values})
            xs = [labels.index(str(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=20)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        for x, r in zip(xs, rows, strict=True):
            stopped = r["status"] != "finished"
            ax.scatter([x], [r["AP"]], c="none" if stopped else "C0", edgecolors="C0", s=36)
        if kind == "loguniform":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
        ax.set_xlabel(key)
        ax.set_ylabel("val AP")
        ax.grid(alpha=0.3)
    fig.suptitle("AP per trial (hollow: stopped early)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def write_best_config(rows: list[dict[str, Any]], path: str | Path, *, name: str, storage_path: str) -> Config:
    """The best trial's full config as JSON (`Config.to_json()`), named `name` and stored under `storage_path`.

    Raises:
        RuntimeError: no trial reported an AP.
    """
    ranked = [r for r in rows if not math.isnan(r["AP"])]
    if not ranked:
        raise RuntimeError("no trial reported val/AP: nothing to write as the best configuration")
    cfg = trial_config(ranked[0]["config"])
    cfg.train.name, cfg.train.storage_path = name, storage_path
    _write_atomic(path, cfg.to_json() + "\n")
    return cfg


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _write_atomic(path: str | Path, text: str) -> str | Path:
    atomic_write(path, text)
    return path
