"""python scripts/bench.py: what the benchmark runs, in which order, and where it writes (sections: cnnpipe.bench)."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cnnpipe.bench import report
from cnnpipe.bench.cifar import write_cifar10
from cnnpipe.bench.headline import PEER, Config, experiment_vs_sgd, run_rounds
from cnnpipe.bench.machine import load_avg, machine_info
from cnnpipe.bench.runs import harness, user_run
from cnnpipe.jsonio import write_json_atomic, write_text_atomic

SECTIONS = ("headline", "cifar", "profile", "kernels", "startup", "shared")
QUICK_SECTIONS = ("headline", "cifar", "profile", "kernels", "startup")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="scripts/bench.py", description=(
        "Benchmark the user's command (python scripts/train.py, one epoch, default config) with the numpy and numba "
        "backends beside the PyTorch peer (python scripts/torch_peer.py, same config), in interleaved rounds; plus "
        "CIFAR-10-shaped runs, a per-layer profile, kernels against torch's ops, start-up and shared cores. Run it "
        "with the BLAS pinning variables unset (make bench does) on an otherwise idle machine."))
    ap.add_argument("--quick", action="store_true", help="smoke run: one round, every run capped at --quick-steps "
                    "steps (extrapolated), short kernel timings, warm start-up only, no shared-cores section")
    ap.add_argument("--out", default="docs/bench", help="writes <out>.json and <out>.md (default docs/bench)")
    ap.add_argument("--readme", default=None, help="also rewrite the section between this file's "
                    "'<!-- bench:start -->' and '<!-- bench:end -->' lines (make bench: README.md)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=None,
                    help=f"default: all ({' '.join(SECTIONS)}); with --quick all but shared")
    ap.add_argument("--models", nargs="+", default=["lenet5", "convnet"], choices=["lenet5", "convnet"])
    ap.add_argument("--pools", nargs="+", default=["max"], choices=["max", "mean"])
    ap.add_argument("--backends", nargs="+", default=["numpy", "numba"], choices=["numpy", "numba"],
                    help="ours; the PyTorch peer always runs beside them")
    ap.add_argument("--experiments", nargs="*", default=["fashion_convnet"], help="experiment=<name> rows (numba)")
    ap.add_argument("--rounds", type=int, default=None, help="runs per row, the backends taking turns (default 3; "
                    "--quick 1)")
    ap.add_argument("--cap-steps", type=int, default=250, help="trainer.max_steps for the slow rows (numpy convnet, "
                    "CIFAR convnet, the convnet profile): their epoch time is extrapolated and marked * (default 250)")
    ap.add_argument("--quick-steps", type=int, default=30, help="--quick: trainer.max_steps for every run")
    ap.add_argument("--bare-budget", type=float, default=10.0, help="seconds per backend for the bare loop before "
                    "its epoch time is extrapolated (default 10)")
    ap.add_argument("--data-root", default=None, help="data.root for Fashion-MNIST (default: train.py's own, which "
                    "finds Debian's copy)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="added to every command (repeatable), e.g. data.val_size=100 for a small data set")
    ap.add_argument("--cifar-size", nargs=2, type=int, default=[50000, 10000], metavar=("TRAIN", "TEST"))
    ap.add_argument("--startup-rounds", type=int, default=2, help="warm start-up runs (--quick: 1)")
    ap.add_argument("--shared-rounds", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the runs write (kept); default: a temporary folder, "
                    "removed at the end unless --keep")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (the runs' output)")
    return ap.parse_args(argv)


def fashion_configs(a, base: list[str]) -> list[Config]:
    out = [Config(f"{m}/{p}", f"{m}, {p} pool", m, [*base, f"model={m}", f"pool={p}"], [*a.backends, PEER],
                  caps={"numpy": a.cap_steps} if m == "convnet" else {}) for m in a.models for p in a.pools]
    if "lenet5" in a.models and "numba" in a.backends:      # logging's share without a validation split
        out.append(Config("lenet5/max/no-val", "lenet5, max pool, data.val_size=0", "lenet5",
                          [*base, "model=lenet5", "pool=max", "data.val_size=0"], ["numba"], bare=False))
    out += [Config(e, f"experiment={e}", "convnet", [*base, f"experiment={e}"], ["numba", PEER])
            for e in a.experiments]
    return out


def cifar_configs(a, base: list[str]) -> list[Config]:
    return [Config(f"cifar10/{m}", f"{m}, max pool", m, [*base, f"model={m}"],
                   ([*a.backends] if m == "lenet5" else ["numba"]) + [PEER],
                   caps={b: a.cap_steps for b in ("numba", PEER)} if m == "convnet" else {}) for m in a.models]


def quick(configs: list[Config], steps: int) -> list[Config]:
    for c in configs:
        c.caps = {b: steps for b in c.backends}
    return configs


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    sections = a.sections or (QUICK_SECTIONS if a.quick else SECTIONS)
    rounds = a.rounds or (1 if a.quick else 3)
    work = Path(a.workdir).resolve() if a.workdir else Path(tempfile.mkdtemp(prefix="cnnpipe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    say = lambda msg: print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    base = ([f"data.root={Path(a.data_root).resolve()}"] if a.data_root else []) + a.override
    cap = [f"trainer.max_steps={a.quick_steps}"] if a.quick else []
    rep = {"command": "python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": machine_info(), "load_avg_start": load_avg(), "rounds": rounds, "quick": a.quick,
           "targets": report.load_targets()}
    say(f"sections {' '.join(sections)}; temporary folder {work}")
    t_start = time.perf_counter()
    try:
        if "headline" in sections:
            configs = fashion_configs(a, base)
            rep["fashion"] = run_rounds(quick(configs, a.quick_steps) if a.quick else configs, rounds, work,
                                        a.bare_budget, cap, say)
            ratios = experiment_vs_sgd({s["key"]: s for s in rep["fashion"]}, a.experiments)
            if ratios:
                rep["experiment_vs_sgd"] = ratios
        if "cifar" in sections:
            root = write_cifar10(work / "cifar10", *a.cifar_size)
            configs = cifar_configs(a, ["data=cifar10", f"data.root={root}", "data.verify=false", *a.override])
            rep["cifar_size"] = a.cifar_size
            rep["cifar"] = run_rounds(quick(configs, a.quick_steps) if a.quick else configs, rounds, work,
                                      a.bare_budget, cap, say)
        if "profile" in sections:
            rep["profile"] = []
            for m in a.models:
                steps = a.quick_steps if a.quick else a.cap_steps if m == "convnet" else None
                ov = [*base, f"model={m}", "backend=numba", "trainer.profile=true"] + (
                    [f"trainer.max_steps={steps}"] if steps else [])
                r = user_run("ours", ov, work, f"profile-{m}", files=("profile.json",))
                rep["profile"].append({"model": m, **r})
                say(f"profile {m}: " + r.get("error", "done"))
        if "kernels" in sections:
            rep["kernels"] = {}
            for b in [*a.backends, PEER]:
                spec = {"backend": b, "models": a.models, "batch_size": 64, "min_time": 0.02 if a.quick else 0.3}
                r = harness("kernels", [json.dumps(spec)], work / f"kernels-{b}.out")
                rep["kernels"][b] = r.get("result") or {"error": r["error"]}
                say(f"kernels {b}: " + r.get("error", "done"))
        if "startup" in sections:
            from cnnpipe.bench.startup import startup_section
            rep["startup"] = startup_section(work, 1 if a.quick else a.startup_rounds, cold=not a.quick,
                                             overrides=base)
            say("start-up: done")
        if "shared" in sections:
            from cnnpipe.bench.shared import shared_section
            rep["shared"] = shared_section([*base, "model=lenet5", "backend=numba", *cap], work, a.shared_rounds)
            say("shared cores: done")
    finally:
        if not (a.keep or a.workdir):
            shutil.rmtree(work, ignore_errors=True)
    rep["load_avg_end"] = load_avg()
    rep["total_seconds"] = time.perf_counter() - t_start
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), rep, indent=1)
    md = report.render(rep)
    write_text_atomic(out.with_suffix(".md"), md)
    if a.readme:
        report.write_readme_section(Path(a.readme), report.render_readme(rep, out))
    print(md)
    failed = report.failures(rep)
    if failed:
        print(f"{len(failed)} benchmark run(s) failed: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
