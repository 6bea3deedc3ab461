"""The headline: one epoch of the user's command for each configuration and backend, the PyTorch peer beside it,
in rounds where the backends take turns (so a machine whose speed drifts favours none of them); the bare loop
once per configuration, to show what the trainer and its logging add."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from cnnpipe.bench.runs import harness, user_run

PEER = "torch"


@dataclass
class Config:
    key: str                          # "lenet5/max", "fashion_convnet", ...: the row group's name in the JSON
    label: str                        # the table's first column
    model: str                        # the targets' key (lenet5, convnet)
    overrides: list[str]              # for ours and the peer alike
    backends: list[str]               # ours (numpy, numba) and PEER
    caps: dict[str, int] = field(default_factory=dict)   # backend → trainer.max_steps (extrapolated rows)
    bare: bool = True

    def command_overrides(self, backend: str) -> list[str]:
        ov = list(self.overrides) + ([] if backend == PEER else [f"backend={backend}"])
        return ov + ([f"trainer.max_steps={self.caps[backend]}"] if backend in self.caps else [])


def run_rounds(configs: list[Config], rounds: int, workdir: Path, bare_budget: float | None, bare_overrides=(),
               say=print) -> list[dict]:
    """Every configuration's runs, round by round (round k starts with the k-th backend); the summaries."""
    runs = {c.key: {b: [] for b in c.backends} for c in configs}
    bare = {}
    for k in range(rounds):
        for c in configs:
            i = k % len(c.backends)
            for b in c.backends[i:] + c.backends[:i]:
                label = f"{c.key.replace('/', '-')}-{b}-r{k}"
                r = user_run("torch" if b == PEER else "ours", c.command_overrides(b), workdir, label)
                runs[c.key][b].append({**r, "round": k})
                say(f"{c.label} / {b} (round {k + 1}/{rounds}): " + (
                    r["error"] if "error" in r else f"{r['epoch_seconds']:.2f} s/epoch"
                    + ("" if r["full_epoch"] else f" (extrapolated from {r['steps']} steps)")
                    + f", {r['wall_s']:.0f} s wall"))
            if k == 0 and c.bare:
                for b in c.backends:
                    args = ["--backend", b] + (["--budget", str(bare_budget)] if bare_budget else [])
                    r = harness("bare", [*args, "--", *c.overrides, *bare_overrides],
                                workdir / f"{c.key.replace('/', '-')}-{b}-bare.out")
                    bare[c.key, b] = r
                    say(f"{c.label} / {b} bare loop: " + r.get("error", f"{r['result']['epoch_seconds']:.2f} s/epoch"))
    return [summarize(c, runs[c.key], {b: bare.get((c.key, b)) for b in c.backends}) for c in configs]


def summarize(c: Config, runs: dict[str, list[dict]], bare: dict[str, dict | None]) -> dict:
    """Per backend: the median epoch time and its spread over the rounds, the median of the rounds' paired ratios
    to the peer, the bare loop's epoch time, the TensorBoard share, the highest peak RSS."""
    rows = {}
    for b, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rows[b] = {"error": rs[0]["error"], "runs": rs}
            continue
        e = [r["epoch_seconds"] for r in ok]
        row = {"runs": rs, "epoch_seconds": statistics.median(e), "spread": (max(e) - min(e)) / statistics.median(e),
               "samples_per_second": statistics.median(r["samples_per_second"] for r in ok),
               "full_epoch": all(r["full_epoch"] for r in ok), "steps": ok[0]["steps"],
               "peak_rss_mb": max(r["peak_rss_mb"] for r in ok), "command": ok[0]["command"]}
        shares = [r["tb_share"] for r in ok if "tb_share" in r]
        if shares:
            row["tb_share"] = statistics.median(shares)
            row["tb_once_seconds"] = statistics.median(r["tb_once_seconds"] for r in ok if "tb_share" in r)
        peer = {r["round"]: r for r in runs.get(PEER, []) if "error" not in r}
        ratios = [r["epoch_seconds"] / peer[r["round"]]["epoch_seconds"] for r in ok if r["round"] in peer]
        if ratios and b != PEER:
            row.update(ratio=statistics.median(ratios), ratios=ratios)
        br = bare.get(b) or {}
        if "result" in br:
            br = br["result"]
            row.update(bare_epoch_seconds=br["epoch_seconds"], bare_full_epoch=br["full_epoch"],
                       overhead=row["epoch_seconds"] / br["epoch_seconds"] - 1)
        elif "error" in br:
            row["bare_error"] = br["error"]
        rows[b] = row
    return {"key": c.key, "label": c.label, "model": c.model, "overrides": c.overrides, "rows": rows}


def paired_ratio(a: dict, b: dict, backend: str) -> list[float]:
    """Per round: a's time per sample ÷ b's, for one backend (two configurations run in the same rounds)."""
    ra = {r["round"]: r for r in a["rows"].get(backend, {}).get("runs", []) if "error" not in r}
    rb = {r["round"]: r for r in b["rows"].get(backend, {}).get("runs", []) if "error" not in r}
    return [rb[k]["samples_per_second"] / ra[k]["samples_per_second"] for k in sorted(ra.keys() & rb.keys())]


def experiment_vs_sgd(by_key: dict[str, dict], experiments: list[str]) -> dict[str, list[float]]:
    """Per experiment row run beside the SGD convnet: its numba time per sample ÷ the SGD convnet's, per round."""
    if "convnet/max" not in by_key:
        return {}
    return {e: paired_ratio(by_key[e], by_key["convnet/max"], "numba") for e in experiments if e in by_key}
