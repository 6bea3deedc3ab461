"""The sweep's summary: one row per job directory, ranked by the optimized metric, as summary.csv and summary.md."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import yaml

from cnnpipe.jsonio import atomic_path, read_json, write_text_atomic
from cnnpipe.metrics import lower_is_better
from cnnpipe.sweep.job import JOB_FILE

SHOWN_METRICS = ("test_acc", "test_loss", "val_acc", "val_loss", "train_loss", "epochs", "samples_per_second")


def collect_jobs(sweep_dir: Path) -> list[dict]:
    """One row per job directory under the sweep (job.json written by run_job; metrics.json by the trainer)."""
    rows = []
    job_dirs = {p.parent for p in sweep_dir.rglob(JOB_FILE)}
    job_dirs |= {p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")}     # started, no record
    for d in sorted(job_dirs):
        job = read_json(d / JOB_FILE)
        if job is None:                                     # Hydra made the directory but the job never started
            overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) or []
            job = {"num": _num(d.name), "overrides": overrides, "status": "not started", "error": None, "seconds": 0.0}
        metrics = read_json(d / "metrics.json") if job.get("status") == "finished" else None
        row = {"job": job.get("num"), "status": job.get("status"), "metric_name": job.get("metric_name"),
               "metric": None, "overrides": " ".join(job.get("overrides") or []),
               "_overrides": job.get("overrides") or [],
               "seconds": round(float(job.get("seconds") or 0.0), 2), "threads": job.get("threads"),
               "resumed": job.get("resumed", False), "error": job.get("error"), "dir": str(d.relative_to(sweep_dir))}
        for k in SHOWN_METRICS:
            row[k] = metrics.get(k) if metrics else None
        if metrics and row["metric_name"]:
            row["metric"] = metrics.get(row["metric_name"])
        rows.append(row)
    mark_died(rows)
    mark_varied(rows)
    return rows


def mark_varied(rows):
    """`params`: the overrides whose value differs between jobs (what the sweep varied), for the tables."""
    lists = [dict(o.partition("=")[::2] for o in r["_overrides"]) for r in rows]
    keys = dict.fromkeys(k for d in lists for k in d)
    varied = [k for k in keys if len({d.get(k) for d in lists}) > 1] if len(rows) > 1 else list(keys)
    for r, d in zip(rows, lists):
        r["params"] = " ".join(f"{k}={d[k]}" for k in varied if k in d)


def mark_died(rows):
    """A job still 'running' when the sweep has ended died without a word (killed, out of memory, node lost)."""
    for r in rows:
        if r["status"] == "running":
            r["status"] = "died"
            r["error"] = r["error"] or ("the job ended without recording a result (killed?); resume with "
                                        "sweep.resume=true")
    return rows


def _num(name):
    try:
        return int(name)
    except ValueError:
        return name


def direction(config, rows) -> str:
    """The optuna sweeper's direction when there is one, else from the metric's name (…loss: minimize)."""
    direction = str(getattr(config.hydra.sweeper.get("direction"), "name", config.hydra.sweeper.get("direction")))
    if direction in ("minimize", "maximize"):
        return direction
    name = next((r["metric_name"] for r in rows if r["metric_name"]), "") or ""
    return "minimize" if lower_is_better(name) else "maximize"


def sort_rows(rows, direction):
    """Finished jobs by the optimized metric (best first), then the others in job order."""
    sign = -1.0 if direction == "maximize" else 1.0
    ok = [r for r in rows if r["metric"] is not None and math.isfinite(r["metric"])]
    rest = [r for r in rows if r not in ok]
    ok.sort(key=lambda r: (sign * r["metric"], str(r["job"])))
    rest.sort(key=lambda r: str(r["job"]).zfill(8))
    for rank, r in enumerate(ok + rest, 1):
        r["rank"] = rank if r in ok else None
    return ok + rest


COLUMNS = ["rank", "job", "status", "metric_name", "metric", "params", "overrides", *SHOWN_METRICS, "seconds",
           "threads", "resumed", "error", "dir"]


def write_summary(sweep_dir: Path, rows):
    with atomic_path(sweep_dir / "summary.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    write_text_atomic(sweep_dir / "summary.md", markdown_table(rows) + "\n")


def table_cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows, columns=("rank", "job", "status", "metric", "params", "test_acc", "val_acc",
                                    "train_loss", "epochs", "seconds", "error")):
    name = next((r["metric_name"] for r in rows if r.get("metric_name")), "metric")
    columns = [c for c in columns if c != name]             # the optimized metric is shown once, as `metric`
    head = [name if c == "metric" else c for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(table_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def format_top(rows, sweep_dir, direction, top=5):
    n_ok = sum(r["status"] == "finished" for r in rows)
    head = (f"\nSweep summary: {len(rows)} jobs, {n_ok} finished, {len(rows) - n_ok} not "
            f"(sorted by {next((r['metric_name'] for r in rows if r['metric_name']), 'metric')}, {direction}); "
            f"all rows in {sweep_dir / 'summary.md'} and summary.csv")
    return head + "\n" + markdown_table(rows[:top]) + ("\n..." if len(rows) > top else "")
