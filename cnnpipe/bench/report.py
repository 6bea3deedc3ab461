"""The benchmark's markdown (docs/bench.md) and the README's section, from the JSON report and the targets
(docs/bench-targets.yaml)."""
from __future__ import annotations

import re
from pathlib import Path

from cnnpipe.bench.runs import REPO

TARGETS = REPO / "docs" / "bench-targets.yaml"
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
NAMES = {"torch": "PyTorch peer"}


def load_targets() -> dict:
    from omegaconf import OmegaConf
    return OmegaConf.to_container(OmegaConf.load(TARGETS))


def failures(rep: dict) -> list[str]:
    out = [f"{s['label']}/{b}: {r['error']}" for part in ("fashion", "cifar") for s in rep.get(part, [])
           for b, r in s["rows"].items() if "error" in r]
    out += [f"profile {p['model']}: {p['error']}" for p in rep.get("profile", []) if "error" in p]
    return out


def _table(header, rows, left=1) -> str:
    """A markdown table; the first `left` columns are text, the rest numbers (right-aligned)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < left else "---:" for i in
                                                             range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _check(value, limit, at_least=False) -> str:
    ok = value >= limit if at_least else value <= limit
    return "✅" if ok else "❌"


def _pct(v) -> str:
    return f"{100 * v:.1f} %"


def runs_table(summaries: list[dict], t: dict, targeted: bool) -> str:
    """One row per configuration and backend: the user's command's epoch beside the peer's and the bare loop's."""
    rows = []
    for s in summaries:
        for b, r in s["rows"].items():
            name = [s["label"], NAMES.get(b, b)]
            if "error" in r:
                rows.append([*name, "failed: " + r["error"][:100]] + [""] * 8)
                continue
            star = "" if r["full_epoch"] else "*"
            ratio = target = ""
            if "ratio" in r:
                ratio = f"{r['ratio']:.2f}× ({min(r['ratios']):.2f}–{max(r['ratios']):.2f})"
                plain = targeted and s["key"].count("/") == 1            # model/pool: not an experiment or no-val row
                limit = t["ratio_to_torch"].get(f"{s['model']}/{b}") if plain else None
                target = f"≤ {limit}× {_check(r['ratio'], limit)}" if limit else ""
            bare = overhead = tb = ""
            if "bare_epoch_seconds" in r:
                bare = f"{r['bare_epoch_seconds']:.2f}{'' if r['bare_full_epoch'] else '*'}"
                overhead = f"{100 * r['overhead']:+.0f} %"
            if "tb_share" in r:
                check = _check(r["tb_share"], t["logging_share"])
                tb = f"{_pct(r['tb_share'])} (+{r['tb_once_seconds']:.2f} s) {check}"
            rss = f"{r['peak_rss_mb']:.0f}"
            limit = t["peak_rss_mb"].get(s["model"]) if targeted and b != "torch" else None
            if limit:
                rss += f" (≤ {limit} {_check(r['peak_rss_mb'], limit)})"
            runs = " / ".join(f"{x['epoch_seconds']:.2f}" for x in r["runs"] if "error" not in x)
            rows.append([*name, f"{r['epoch_seconds']:.2f}{star}", runs, f"{r['samples_per_second']:,.0f}", ratio,
                         target, bare, overhead, tb, rss])
    header = ["configuration", "backend", "s/epoch", "rounds", "samples/s", "× PyTorch (rounds)", "target",
              "bare loop s/epoch", "trainer + logging", "TensorBoard share", "peak RSS MB"]
    return _table(header, rows, left=2)


def commands(summaries: list[dict]) -> str:
    """Each configuration's two commands (ours with its backends, the peer's)."""
    lines = []
    for s in summaries:
        ours = [r for b, r in s["rows"].items() if b != "torch" and "command" in r]
        peer = s["rows"].get("torch", {}).get("command")
        backends = "|".join(b for b in s["rows"] if b != "torch")
        cmd = re.sub(r"backend=\w+", f"backend=<{backends}>" if "|" in backends else f"backend={backends}",
                     ours[0]["command"]) if ours else ""
        lines.append(f"- {s['label']}: `{cmd}`" + (f"; peer `{peer}`" if peer else ""))
    return "\n".join(lines)


def headline_text(rep: dict, part: str) -> list[str]:
    t, s = rep["targets"], rep[part]
    out = [runs_table(s, t, targeted=part == "fashion"), "", "Commands (`trainer.max_steps=N`: the epoch time is "
           "extrapolated from the steps done, marked *):", "", commands(s), ""]
    if part == "fashion":
        for e, ratios in rep.get("experiment_vs_sgd", {}).items():
            if ratios:
                limit = t["experiment_vs_sgd"].get(e)
                med = sorted(ratios)[(len(ratios) - 1) // 2]
                out.append(f"`experiment={e}` against the SGD convnet (numba), time per sample: {med:.2f}× (rounds: "
                           + ", ".join(f"{x:.2f}" for x in ratios) + ")"
                           + (f"; target ≤ {1 + limit:.2f}× {_check(med, 1 + limit)}" if limit else "") + ".")
        shares = {val: [r["tb_share"] for x in s for b, r in x["rows"].items() if "tb_share" in r
                        for run in r["runs"][:1] if run.get("val") == val] for val in (True, False)}
        out.append("TensorBoard at default settings, the largest share of any row's training loop: "
                   + "; ".join(f"{'with' if v else 'without'} a validation split {_pct(max(x))}"
                               for v, x in shares.items() if x) + f" (target ≤ {_pct(t['logging_share'])}).")
        out.append("")
    return out


def profile_text(p: dict) -> list[str]:
    e = p["files"]["profile.json"]["epochs"][-1]
    layers, other = {}, []
    for r in e["rows"]:
        if r["group"] == "layer":
            layers.setdefault(r["layer"], {"describe": r["describe"]})[r["pass"]] = r
        else:
            other.append(r)
    plain = lambda r: [r["part"], f"{r['ms_per_step']:.3f}", _pct(r["share"]), ""]  # noqa: E731
    rows = [plain(r) for r in other if r["group"] == "data"]
    for name, d in layers.items():
        f, b = d["forward"], d["backward"]
        rows.append([f"{name} ({d['describe']})", f"{f['ms_per_step'] + b['ms_per_step']:.3f} ({f['ms_per_step']:.3f}"
                     f" / {b['ms_per_step']:.3f})", _pct(f["share"] + b["share"]),
                     f"{f['gflops']:.1f} / {b['gflops']:.1f}" if "gflops" in f and "gflops" in b else ""])
    rows += [plain(r) for r in other if r["group"] != "data"]
    return [f"`{p['command']}`: {e['steps']} steps, {e['ms_per_step']:.2f} ms a step.", "",
            _table(["part", "ms/step (forward / backward)", "share", "GFLOP/s (forward / backward)"], rows), ""]


def kernels_text(k: dict) -> list[str]:
    good = {b: {(r["model"], r["layer"], r["op"]): r["ms"] for r in v} for b, v in k.items() if isinstance(v, list)}
    if not good:
        return [f"kernels {b}: {v['error']}" for b, v in k.items()]
    keys = [(r["model"], r["layer"], r["op"]) for r in next(v for v in k.values() if isinstance(v, list))]
    ours = [b for b in good if b != "torch"]
    rows = [[*key, *(f"{good[b].get(key, float('nan')):.3f}" for b in good)]
            + ([f"{good[b][key] / good['torch'][key]:.2f}×" for b in ours] if "torch" in good else [])
            for key in keys]
    header = ["model", "layer", "op", *(f"{b} ms" for b in good)] + \
             ([f"{b} / torch" for b in ours] if "torch" in good else [])
    return [_table(header, rows, left=3), ""] + [f"kernels {b}: {v['error']}" for b, v in k.items() if b not in good]


def startup_text(s: dict, t: dict) -> list[str]:
    rows = []
    for key, label in (("numba_cold", "numba, cold cache"), ("numba_warm", "numba, warm cache"),
                       ("numpy", "numpy (for reference)")):
        r = s.get(key)
        if r is None:
            continue
        if "error" in r:
            rows.append([label, "failed", "", r["error"][:80], ""])
            continue
        f = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
        target = f"≤ {t['warm_start_s']} s {_check(r['to_first_step_s'], t['warm_start_s'])}" \
            if key == "numba_warm" else ""
        rows.append([label, f(r["to_model_s"]), f(r["to_data_s"]), f(r["to_first_step_s"]), target])
    out = [_table(["run", "to model s", "to data s", "to first step s", "target"], rows), "",
           f"Command: `{s['numba_warm'].get('command', '')}`" + (f"; cold compile {s['cold_compile_s']:.1f} s, "
                                                                 f"{s['cache_files']} cache files."
                                                                 if "cold_compile_s" in s else "."), ""]
    return out


def shared_text(s: dict, t: dict) -> list[str]:
    if "alone_samples_per_second" not in s:
        return ["Failed: " + "; ".join(r.get("error", "") for r in s["alone"])[:300], ""]
    lim = t["shared_cores"]
    sweep, busy = s["sweep_job_share"], s["busy_share"]
    rows = [["one job alone", f"`{s['alone'][0]['command']}`", f"{s['alone_samples_per_second']:,.0f}", "100 %", ""]]
    if sweep:
        rows.append(["each of two sweep jobs", f"`{next(r['command'] for r in s['sweep'] if 'error' not in r)}`", "",
                     " / ".join(f"{100 * v:.0f} %" for v in sweep),
                     f"≥ {100 * lim['sweep_job_share']:.0f} % {_check(min(sweep), lim['sweep_job_share'], True)}"])
    if busy:
        rows.append(["beside a busy core", "the same as alone, while `python -c 'while True: pass'` spins on core 0",
                     "", " / ".join(f"{100 * v:.0f} %" for v in busy),
                     f"≥ {100 * lim['busy_core_share']:.0f} % {_check(min(busy), lim['busy_core_share'], True)}"])
    return [_table(["run", "command", "samples/s", "of alone (rounds)", "target"], rows, left=2), ""]


def render(rep: dict, explain: bool = True) -> str:
    """docs/bench.md; explain=False leaves out the paragraph on what a row is (the README says it above its section)."""
    m, t = rep["machine"], rep["targets"]
    out = ["# Benchmark: the user's command, numpy and numba beside PyTorch", "",
           f"Measured {m['date']} on {m['cpu']} ({m['cpus']} cores; {', '.join(m['simd'])}; {m.get('mem_gb', '?')} "
           f"GB), {m['platform']}, Python {m['python']}, numpy {m['numpy']}, numba {m['numba']}, torch {m['torch']}; "
           f"BLAS {'; '.join(m['blas']) or '?'}; the numba kernels' GEMM from {m.get('gemm', '?')}. Environment: "
           f"{', '.join(f'{k}={v}' for k, v in m['env'].items()) or 'no BLAS/thread variables set'}. Load average "
           f"at start {rep['load_avg_start']}, at end {rep['load_avg_end']}. Targets: docs/bench-targets.yaml.", ""]
    if (rep["load_avg_start"] or [0])[0] > 0.5 * m["cpus"]:
        out += [f"**Warning: the machine was busy** (1-minute load average {rep['load_avg_start'][0]:.1f} on "
                f"{m['cpus']} cores at the start): timings suffer when another process holds a core. Rerun on an "
                "idle machine for fair numbers.", ""]
    if {"OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"} & set(m["env"]):
        out += ["**Warning: BLAS pinning variables were set**: `make bench` unsets them.", ""]
    out += [f"Command: `{rep['command']}` ({rep['total_seconds']:.0f} s in all).", ""]
    what = (f"Each row is one epoch of the user's command, `python scripts/train.py` with the default config "
            f"(TensorBoard on at its default frequencies, checkpoints, validation split, progress bar writing to a "
            f"file as in a non-interactive run) plus the overrides listed below it; the PyTorch peer is "
            f"`python scripts/torch_peer.py` with the same overrides (the same network, initial weights, batches "
            f"and optimizer; loss and accuracy read back each step, TensorBoard scalars every "
            f"`logger.scalar_every` steps). s/epoch is the training loop's time from the run's own metrics.json "
            f"(`epoch_seconds`), the median of {rep['rounds']} round(s) in which the backends took turns; × "
            f"PyTorch is the median of the rounds' paired ratios (range in brackets). The bare loop is "
            f"`cnnpipe.step.train_step` alone over the same batches (no callbacks; `python -m cnnpipe.bench.bare`, "
            f"once per configuration, stopped after a time budget and extrapolated where marked *), so trainer + "
            f"logging is what the user's command adds. TensorBoard share: its hooks' time in the training loop and "
            f"at the epochs' ends over the training loop, from the run's train.log (in brackets: once a run, "
            f"outside the loop: opening the event file and the final images). Peak RSS: the process's "
            f"maximum resident set.")
    if "fashion" in rep:
        out += ["## Fashion-MNIST: one epoch of the user's command", ""] + ([what, ""] if explain else []) \
            + headline_text(rep, "fashion")
    if "cifar" in rep:
        n, nt = rep["cifar_size"]
        out += ["## CIFAR-10-shaped: 3×32×32, 10 classes", "",
                f"Synthetic learnable images ({n:,} train, {nt:,} test) written in CIFAR-10's python on-disk format "
                "(`cnnpipe/bench/cifar.py`), read by torchvision's CIFAR10 through `data=cifar10 data.root=<tmp> "
                "data.verify=false` (the real set is not reachable here; the cost depends on the shapes). CIFAR's "
                "defaults apply: validation split, random crop and flip. Columns as above.", ""]
        out += headline_text(rep, "cifar")
    if rep.get("profile"):
        out += ["## Per-layer profile: `trainer.profile=true`", "",
                "Where a step's time goes in the user's command (numba), from the run's profile.json: each layer's "
                "forward + backward, the data batch, the optimizer step, the callbacks' hooks and the rest (loss, "
                "learning-rate schedule, progress bar, bookkeeping). GFLOP/s count a conv or dense layer's "
                "backward as 2× its forward FLOPs (1× for the first layer, which computes no δ for its input).", ""]
        for p in rep["profile"]:
            out += [f"### {p['model']}", ""] + (profile_text(p) if "error" not in p else [p["error"], ""])
    if rep.get("shared"):
        out += ["## Shared cores", "", "Samples/s of a lenet5 numba epoch (`scripts/train.py`) as a share of the "
                "same run alone.", ""] + shared_text(rep["shared"], t)
    if rep.get("startup"):
        out += ["## Start-up", "", "`python scripts/train.py backend=numba` from launch to its first finished "
                "training step (the trainer's `step 1` debug line), with a cold numba cache (a fresh "
                "`NUMBA_CACHE_DIR`: everything compiles) and a warm one (best of the warm runs). Columns: seconds "
                "to the model summary, to the data line, to the first step.", ""] + startup_text(rep["startup"], t)
    if rep.get("kernels"):
        out += ["## Kernels", "", "Median time of one call, batch 64, float32, random data; torch: `F.conv2d` / "
                "`F.max_pool2d` / `F.avg_pool2d` under `no_grad`, backward through `torch.autograd.grad` on a kept "
                "graph. Conv backward computes dx, dW, db (the first layer dW, db only, as in training).", ""]
        out += kernels_text(rep["kernels"])
    return "\n".join(out).rstrip() + "\n"


def render_readme(rep: dict, out: Path) -> str:
    """The README's section: the machine, the user's-command tables, shared cores, start-up; a link to the rest."""
    md = render(rep, explain=False)
    parts = md.split("\n## ")
    keep = [p for p in parts[1:] if p.startswith(("Fashion-MNIST", "CIFAR-10", "Shared cores", "Start-up"))]
    head = parts[0].split("\n", 2)[2].strip()
    body = "\n\n".join("#### " + p.strip() for p in keep)
    md_path, js = out.with_suffix(".md").as_posix(), out.with_suffix(".json").as_posix()
    return (f"### Results\n\n{head}\n\n{body}\n\nThe per-layer profile and the kernels against torch's ops: "
            f"[{md_path}]({md_path}) (every number: [{js}]({js})).\n")


def write_readme_section(path: Path, section: str) -> None:
    """Replace what lies between the README's bench markers with `section` (no markers: write the whole file)."""
    text = path.read_text() if path.exists() else ""
    if README_START in text and README_END in text.split(README_START, 1)[1]:
        before, rest = text.split(README_START, 1)
        path.write_text(f"{before}{README_START}\n{section}{README_END}{rest.split(README_END, 1)[1]}")
    else:
        path.write_text(section)
