"""Seed statistics of a sweep: its jobs grouped by configuration (their overrides other than trainer.seed), every
metric's mean ± sample std over the finished seeds, ranked by the optimized metric's mean, as summary_by_config.csv
and summary_by_config.md. One seed's result says little about a setting; the spread over seeds says how much."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from cnnpipe.jsonio import atomic_path, write_text_atomic
from cnnpipe.sweep.summary import SHOWN_METRICS, table_cell

SEED_KEY = "trainer.seed"
STEM = "summary_by_config"
METRICS = ("metric", *SHOWN_METRICS)                 # `metric`: the optimized one, whatever its name
COLUMNS = ["rank", "params", "config", "n", "failed", "seeds", "jobs", "metric_name",
           *[f"{m}_{s}" for m in METRICS for s in ("mean", "std", "n")]]
TABLE_METRICS = ("test_acc", "val_acc", "test_loss", "train_loss")   # shown in the .md besides the optimized one


def _pair(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _job_order(row) -> str:
    return str(row["job"]).zfill(8)


def varies_seed(rows) -> bool:
    """Does the sweep give its jobs more than one trainer.seed? Only then are there seeds to average over."""
    return len({v for r in rows for k, v in map(_pair, r["_overrides"]) if k == SEED_KEY}) > 1


def stats(values) -> dict:
    """mean, sample std (ddof=1; None for a single value) and n of the finite values (None, NaN left out)."""
    x = np.array([float(v) for v in values if v is not None and math.isfinite(float(v))], np.float64)
    return {"mean": float(x.mean()) if len(x) else None, "std": float(x.std(ddof=1)) if len(x) > 1 else None,
            "n": len(x)}


def group_by_config(rows) -> list[dict]:
    """One row per configuration: the statistics of every metric over its finished jobs; jobs that did not finish
    (failed, died, interrupted, not started) are counted in `failed`, never averaged."""
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=_job_order):
        config = tuple((k, v) for k, v in map(_pair, r["_overrides"]) if k != SEED_KEY)
        groups.setdefault(tuple(sorted(config)), []).append({"row": r, "config": dict(config)})
    out = []
    for members in groups.values():
        jobs = [m["row"] for m in members]
        done = [r for r in jobs if r["status"] == "finished"]
        seeds = [dict(map(_pair, r["_overrides"])).get(SEED_KEY, "default") for r in jobs]
        c = {"_config": members[0]["config"], "config": " ".join(f"{k}={v}" for k, v in members[0]["config"].items()),
             "n": len(done), "failed": len(jobs) - len(done), "seeds": " ".join(seeds),
             "jobs": " ".join(str(r["job"]) for r in jobs),
             "metric_name": next((r["metric_name"] for r in jobs if r["metric_name"]), None)}
        for m in METRICS:
            for s, v in stats(r[m] for r in done).items():
                c[f"{m}_{s}"] = v
        out.append(c)
    _mark_varied(out)
    return out


def _mark_varied(configs):
    """`params`: the settings that differ between configurations (all of them when there is one configuration)."""
    keys = dict.fromkeys(k for c in configs for k in c["_config"])
    varied = [k for k in keys if len({c["_config"].get(k) for c in configs}) > 1] if len(configs) > 1 else list(keys)
    for c in configs:
        c["params"] = " ".join(f"{k}={c['_config'][k]}" for k in varied if k in c["_config"]) or "(defaults)"


def rank_configs(configs, direction: str) -> list[dict]:
    """Best mean of the optimized metric first (in its direction); configurations without a finished job last."""
    sign = -1.0 if direction == "maximize" else 1.0
    ok = [c for c in configs if c["metric_mean"] is not None]
    rest = [c for c in configs if c["metric_mean"] is None]
    ok.sort(key=lambda c: sign * c["metric_mean"])                # stable: ties keep the job order
    for rank, c in enumerate(ok, 1):
        c["rank"] = rank
    for c in rest:
        c["rank"] = None
    return ok + rest


def seed_statistics(rows, direction: str) -> list[dict] | None:
    """The ranked configuration rows of a sweep that varies trainer.seed; None for one that does not."""
    return rank_configs(group_by_config(rows), direction) if varies_seed(rows) else None


def write_by_config(sweep_dir: Path, configs) -> None:
    with atomic_path(sweep_dir / f"{STEM}.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(configs)
    write_text_atomic(sweep_dir / f"{STEM}.md", markdown_table(configs) + "\n")


def mean_std(c, m) -> str:
    """`mean ± std (n)`; `mean (1)` for one value; empty for none."""
    mean, std, n = c[f"{m}_mean"], c[f"{m}_std"], c[f"{m}_n"]
    if mean is None:
        return ""
    return f"{table_cell(float(mean))}{'' if std is None else ' ± ' + table_cell(float(std))} ({n})"


def markdown_table(configs) -> str:
    name = next((c["metric_name"] for c in configs if c["metric_name"]), "metric")
    others = [m for m in TABLE_METRICS if m != name]
    head = ["rank", "params", f"{name} mean ± std (n)", "failed", "seeds", *others]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for c in configs:
        cells = [table_cell(c["rank"]), table_cell(c["params"]), mean_std(c, "metric"), str(c["failed"]), c["seeds"],
                 *[mean_std(c, m) for m in others]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_top_configs(configs, sweep_dir: Path, direction: str, top: int = 5) -> str:
    name = next((c["metric_name"] for c in configs if c["metric_name"]), "metric")
    head = (f"\nSeed statistics: {len(configs)} configuration(s), mean ± sample std over the finished seeds (n), "
            f"ranked by the mean {name} ({direction}); all rows in {sweep_dir / (STEM + '.md')} and {STEM}.csv")
    return head + "\n" + markdown_table(configs[:top]) + ("\n..." if len(configs) > top else "")
