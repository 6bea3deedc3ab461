"""Benchmark: the numpy and numba backends beside PyTorch, in one run, on the same data and batch size.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench.py --out docs/bench
    python scripts/bench.py --quick --out /tmp/bench          # a fraction of an epoch: a smoke test

What it measures (every configuration in its own subprocess, so peak RSS is per configuration):
  1. training epochs: lenet5 and convnet × max and mean pools × numpy, numba, torch. Seconds per epoch of the
     training loop only (batch preparation, forward, softmax-CE, backward, SGD step), samples/s, the ratio to
     PyTorch (the torch twin of the same network with the same weights, torch.optim.SGD with the same lr and
     momentum, the same threads), peak RSS. Three untimed warm-up steps come first, for every backend. Each
     configuration runs --rounds times (default 3), the backends taking turns; rows report the median run.
  2. kernels: conv forward, conv backward, pool forward/backward for every conv/pool layer shape of each model
     at the headline batch size, against torch's own ops (F.conv2d + autograd backward, F.max_pool2d/avg_pool2d).
  3. scaling: time per sample for batch 16-256, and for the convnet with its filter counts halved and doubled.
  4. start-up: `python scripts/train.py backend=numba` to its first training step, with a cold numba cache
     (a fresh NUMBA_CACHE_DIR: everything compiles) and a warm one (the same directory again).
It writes <out>.json (everything) and <out>.md (the tables, with the issue's targets beside the ratios).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULT_TAG = "@@bench-result@@ "
BACKENDS = ("numpy", "numba", "torch")
TARGETS = {  # (model, backend) → max epoch-time ratio to PyTorch (issue 3, batch 64, full epoch, 2 cores)
    ("lenet5", "numba"): 1.0, ("lenet5", "numpy"): 2.0, ("convnet", "numba"): 1.5}
WARM_START_TARGET_S = 5.0
RSS_TARGET_MB = {"lenet5": 1500}
WARMUP_STEPS = 3
SEED = 0


# ---------------------------------------------------------------------------------------------------------------
# the workers: one subprocess each, result printed as one tagged JSON line

def compose_cfg(model, pool, backend, batch_size, data_root, limit_train=None, filters=None):
    """The real train config (Hydra compose), pointed at the full training split (no validation carve)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from cnnpipe.config import register_configs
    register_configs()
    ov = [f"model={model}", f"pool={pool}", f"backend={'numpy' if backend == 'torch' else backend}",
          f"data.root={data_root}", "data.val_size=0", f"trainer.batch_size={batch_size}", f"trainer.seed={SEED}",
          "optim=sgd", "optim.lr=0.05", "optim.momentum=0.9", "dtype=float32"]
    if limit_train:
        ov.append(f"data.limit_train={limit_train}")
    if filters:                       # convnet: the two conv layers are layers 0 and 3
        ov += [f"model.layers.0.filters={filters[0]}", f"model.layers.3.filters={filters[1]}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=ov)


class Runner:
    """One training step for a backend: ours (cnnpipe.step.train_step, the trainer's own) or the torch twin's."""

    def __init__(self, cfg, backend, threads):
        import numpy as np
        from cnnpipe.backends import get_backend, set_threads
        from cnnpipe.model import build_model
        from cnnpipe.optim import build_optimizer
        set_threads(threads, backend)
        self.kind, self.lr = backend, float(cfg.optim.lr)
        B = get_backend("numpy" if backend == "torch" else backend)
        self.model = build_model(cfg, B)
        if backend == "torch":
            import torch
            from cnnpipe.torch_ref import torch_optimizer, torch_twin
            torch.set_num_threads(threads)
            self.net = torch_twin(self.model).train()
            self.opt = torch_optimizer(self.net, cfg.optim)
        else:
            if hasattr(B, "warmup"):
                B.warmup(np.float32)
            self.opt = build_optimizer(cfg.optim, self.model.named_params(), B)

    def step(self, x, y) -> float:
        """One training step on x N,C,H,W float32, y N int64; returns the loss."""
        from cnnpipe.step import train_step
        from cnnpipe.torch_ref import torch_train_step
        if self.kind == "torch":
            return torch_train_step(self.net, self.opt, x, y, self.lr).loss
        return train_step(self.model, self.opt, x, y, self.lr).loss


def time_training(runner, data, batch_size, steps=None, budget_s=None):
    """Seconds for `steps` training steps (None: one full epoch), batch preparation included; stops early once
    budget_s seconds have passed (the epoch time is then extrapolated from the steps done)."""
    import numpy as np
    from cnnpipe.data import batches, num_batches
    kw = dict(mean=data.mean, std=data.std, dtype=np.float32)
    for i, (x, y) in enumerate(batches(data.train, batch_size, shuffle_seed=[SEED, 99], **kw)):
        if i == WARMUP_STEPS:
            break
        runner.step(x, y)                                                # untimed warm-up
    per_epoch = num_batches(len(data.train), batch_size)
    steps = per_epoch if steps is None else min(int(steps), per_epoch)
    losses, seen = [], 0
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(batches(data.train, batch_size, shuffle_seed=[SEED, 0], **kw)):
        if i == steps or (budget_s and time.perf_counter() - t0 > budget_s):
            break
        losses.append(runner.step(x, y))
        seen += len(y)
    seconds = time.perf_counter() - t0
    n, steps = len(data.train), len(losses)
    return {"steps": steps, "samples": seen, "seconds": seconds, "full_epoch": steps == per_epoch,
            "epoch_samples": n, "seconds_per_epoch": seconds * n / seen, "samples_per_s": seen / seconds,
            "us_per_sample": 1e6 * seconds / seen, "ms_per_step": 1e3 * seconds / steps,
            "loss_first": losses[0], "loss_mean": float(np.mean(losses)), "loss_last": losses[-1]}


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0      # Linux: KiB


def worker_train(spec):
    from cnnpipe.data import load_data
    cfg = compose_cfg(spec["model"], spec["pool"], spec["backend"], spec["batch_size"], spec["data_root"],
                      spec.get("limit_train"), spec.get("filters"))
    data = load_data(cfg.data, SEED)
    runner = Runner(cfg, spec["backend"], spec["threads"])
    out = time_training(runner, data, spec["batch_size"], spec.get("steps"), spec.get("budget_s"))
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def worker_scaling(spec):
    """Every scaling point of one backend in one process (peak RSS is not reported here)."""
    from cnnpipe.data import load_data
    data, rows = None, []
    for p in spec["points"]:
        cfg = compose_cfg(p["model"], p["pool"], spec["backend"], p["batch_size"], spec["data_root"],
                          spec.get("limit_train"), p.get("filters"))
        data = data or load_data(cfg.data, SEED)
        runner = Runner(cfg, spec["backend"], spec["threads"])
        steps = max(3, math.ceil(spec["samples"] / p["batch_size"]))
        rows.append({**p, **time_training(runner, data, p["batch_size"], steps)})
    return rows


def time_call(fn, min_time, min_reps=3, max_reps=500):
    """Median seconds of fn() after one untimed call; repeats until min_time has passed (and min_reps)."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), len(times)


def kernel_shapes(model_name, batch_size, data_root):
    """The conv and pool layers of a model as kernel calls: (name, kind, input N,C,H,W, options)."""
    from cnnpipe.backends import get_backend
    from cnnpipe.layers import Conv2d, Pool2d
    from cnnpipe.model import build_model
    cfg = compose_cfg(model_name, "max", "numpy", batch_size, data_root)
    model = build_model(cfg, get_backend("numpy"))
    out = []
    for l in model.layers:
        shape = (batch_size, *l.in_shape)
        if isinstance(l, Conv2d) and l.sym:
            out.append((l.name, "conv", shape, {"F": l.F, "K": l.K, "stride": l.stride, "pad": l.pads[0],
                                                "need_dx": l.need_dx, "out": (batch_size, *l.out_shape)}))
        elif isinstance(l, Pool2d):
            out.append((l.name, "pool", shape, {"size": l.size, "stride": l.stride, "out": (batch_size, *l.out_shape)}))
    return out


def worker_kernels(spec):
    """Per-kernel median times for one backend; torch: its own ops, backward through autograd (graph kept)."""
    import numpy as np
    from cnnpipe.backends import get_backend, set_threads
    set_threads(spec["threads"])
    rng = np.random.default_rng(0)
    min_time = spec["min_time"]
    rows = []
    if spec["backend"] == "torch":
        import torch
        import torch.nn.functional as F
        torch.set_num_threads(spec["threads"])
    else:
        B = get_backend(spec["backend"])
        if hasattr(B, "warmup"):
            B.warmup(np.float32)
    for model_name in spec["models"]:
        for name, kind, shape, o in kernel_shapes(model_name, spec["batch_size"], spec["data_root"]):
            x = rng.standard_normal(shape).astype(np.float32)                        # N,C,H,W
            dy = rng.standard_normal(o["out"]).astype(np.float32)                    # N,F,Ho,Wo (or N,C,Ho,Wo)
            ops = {}
            if kind == "conv":
                w = (rng.standard_normal((o["F"], shape[1], o["K"], o["K"])) * 0.1).astype(np.float32)  # F,C,K,K
                b = np.zeros(o["F"], np.float32)                                     # F
                S, P, need_dx = o["stride"], o["pad"], o["need_dx"]
                if spec["backend"] == "torch":
                    xt, wt, bt, dyt = (torch.from_numpy(a) for a in (x, w, b, dy))
                    ops["conv forward"] = _no_grad(torch, lambda: F.conv2d(xt, wt, bt, S, P))
                    xg = xt.clone().requires_grad_(need_dx)
                    wg, bg = wt.clone().requires_grad_(), bt.clone().requires_grad_()
                    yg = F.conv2d(xg, wg, bg, S, P)
                    inputs = [xg, wg, bg] if need_dx else [wg, bg]
                    ops["conv backward"] = lambda: torch.autograd.grad(yg, inputs, dyt, retain_graph=True)
                else:
                    _, cache = B.conv2d_forward(x, w, b, S, P)
                    ops["conv forward"] = lambda: B.conv2d_forward(x, w, b, S, P)
                    ops["conv backward"] = lambda: B.conv2d_backward(dy, cache, need_dx=need_dx)
                label = f"{name} {_fmt(shape[1:])}→{_fmt(o['out'][1:])} k{o['K']}" + ("" if need_dx else " (no dx)")
                for op, fn in ops.items():
                    sec, reps = time_call(fn, min_time)
                    rows.append({"model": model_name, "layer": label, "op": op, "ms": 1e3 * sec, "reps": reps})
            else:
                for mode in ("max", "mean"):
                    R, S = o["size"], o["stride"]
                    if spec["backend"] == "torch":
                        pool = F.max_pool2d if mode == "max" else F.avg_pool2d
                        xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
                        xg = xt.clone().requires_grad_()
                        yg = pool(xg, R, S)
                        fwd = _no_grad(torch, lambda pool=pool, xt=xt: pool(xt, R, S))
                        bwd = lambda yg=yg, xg=xg, dyt=dyt: torch.autograd.grad(yg, [xg], dyt, retain_graph=True)
                    else:
                        _, cache = B.pool2d_forward(x, R, S, mode)
                        fwd = lambda mode=mode: B.pool2d_forward(x, R, S, mode)
                        bwd = lambda cache=cache: B.pool2d_backward(dy, cache)
                    label = f"{name} {_fmt(shape[1:])} {R}/{S}"
                    for op, fn in ((f"{mode}pool forward", fwd), (f"{mode}pool backward", bwd)):
                        sec, reps = time_call(fn, min_time)
                        rows.append({"model": model_name, "layer": label, "op": op, "ms": 1e3 * sec, "reps": reps})
    return rows


def _no_grad(torch, fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def _fmt(shape):
    return "×".join(str(s) for s in shape)


WORKERS = {"train": worker_train, "scaling": worker_scaling, "kernels": worker_kernels}


def run_worker(kind, spec, timeout):
    """Run one worker in a fresh interpreter (same environment); its result, or {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    wall = time.perf_counter() - t0
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return {"result": json.loads(line[len(RESULT_TAG):]), "wall_s": wall}
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {p.returncode}: {tail}", "stderr": p.stderr[-4000:]}


# ---------------------------------------------------------------------------------------------------------------
# start-up: scripts/train.py backend=numba to its first training step, cold and warm numba cache

STEP1 = re.compile(r"\bstep 1 loss\b")


def time_startup(backend, data_root, cache_dir, workdir, extra=(), timeout=300):
    """Seconds from launching `python scripts/train.py backend=<b>` to its first finished training step
    (the trainer's debug line `step 1 loss ...`, seen through hydra.verbose=cnnpipe and log_every=1), plus when
    the model summary and the data lines appeared. NUMBA_CACHE_DIR=cache_dir decides cold or warm (None: numba's
    default cache beside the backend module)."""
    run_dir = tempfile.mkdtemp(prefix="run-", dir=workdir)
    cmd = [sys.executable, "-u", str(REPO / "scripts" / "train.py"), f"backend={backend}", f"data.root={data_root}",
           f"hydra.run.dir={run_dir}", "trainer.max_steps=1", "trainer.log_every=1", "trainer.progress=false",
           "hydra.verbose=cnnpipe", *extra]
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    marks = {}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    lines = []
    try:
        for line in p.stdout:
            now = time.perf_counter() - t0
            lines.append(line)
            if "model" not in marks and "] - model " in line:
                marks["model"] = now
            elif "data" not in marks and "] - data " in line:
                marks["data"] = now
            elif "step1" not in marks and STEP1.search(line):
                marks["step1"] = now
            if now > timeout:
                break
    finally:
        if "step1" in marks and p.poll() is None:
            p.terminate()                  # the rest (evaluation on the test set) is not start-up
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if "step1" not in marks:
        return {"error": f"no first step seen (exit {p.returncode}): {''.join(lines[-5:]).strip()[-800:]}"}
    return {"to_model_s": marks.get("model"), "to_data_s": marks.get("data"), "to_first_step_s": marks["step1"],
            "command": " ".join((["NUMBA_CACHE_DIR=<fresh dir>"] if cache_dir else []) + ["python",
                                "scripts/train.py", *cmd[3:]]).replace(str(run_dir), "<tmp>")}


def startup_section(data_root, rounds, cold=True, extra=()):
    """Cold (a fresh NUMBA_CACHE_DIR) then warm (the same dir) numba start-up, and numpy's for reference.
    cold=False (--quick): warm runs only, on numba's default cache, which the numba workers just filled."""
    work = Path(tempfile.mkdtemp(prefix="cnnpipe-bench-"))
    try:
        cache = None
        out = {}
        if cold:
            cache = work / "numba-cache"
            cache.mkdir()
            out["numba_cold"] = time_startup("numba", data_root, cache, work, extra)   # empty cache: compiles all
            out["cache_files"] = sum(1 for f in cache.rglob("*") if f.suffix in (".nbi", ".nbc"))
        warm = [time_startup("numba", data_root, cache, work, extra) for _ in range(rounds)]
        out["numba_warm_runs"] = warm
        ok = [w for w in warm if "error" not in w]
        out["numba_warm"] = min(ok, key=lambda w: w["to_first_step_s"]) if ok else warm[-1]
        out["numpy"] = time_startup("numpy", data_root, cache, work, extra)
        c, w = out.get("numba_cold", {"error": "not run"}), out["numba_warm"]
        if "error" not in c and "error" not in w:
            out["cold_compile_s"] = c["to_first_step_s"] - w["to_first_step_s"]
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# the plan, the machine, the report

def machine_info(threads):
    info = {"platform": platform.platform(), "python": platform.python_version(), "threads": threads,
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
        with open("/proc/cpuinfo") as f:
            flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
        info["simd"] = [f for f in ("avx2", "fma", "avx512f") if f in flags]
    except OSError:
        info["cpu"] = platform.processor()
    try:
        with open("/proc/meminfo") as f:
            info["mem_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    import numpy
    info["numpy"] = numpy.__version__
    for mod in ("torch", "numba"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        from threadpoolctl import threadpool_info
        info["blas"] = sorted({f"{d.get('internal_api')} {d.get('version')} ({d.get('architecture')})"
                               for d in threadpool_info() if d.get("user_api") == "blas"})
    except ImportError:
        pass
    info["env"] = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS",
                                                  "NUMBA_NUM_THREADS") if os.environ.get(k) is not None}
    return info


def load_avg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: 20 steps per configuration, batch 64 only, "
                    "a few steps per scaling point, short kernel timings, one warm start-up run")
    ap.add_argument("--out", default="docs/bench", help="writes <out>.json and <out>.md (default docs/bench)")
    ap.add_argument("--steps", type=int, default=None, help="time this many steps per headline configuration "
                    "instead of a full epoch (the epoch time is then extrapolated and marked so)")
    ap.add_argument("--epochs-fraction", type=float, default=None, help="like --steps, as a fraction of an epoch")
    ap.add_argument("--row-budget", type=float, default=10.0, help="seconds: a headline run still going after "
                    "this stops there and its epoch time is extrapolated from the steps done (marked *); 0: no "
                    "limit (default 10: with 3 rounds the whole benchmark takes about 12 minutes)")
    ap.add_argument("--rounds", type=int, default=None, help="headline runs per configuration (default 3; --quick "
                    "1): the backends of one model and pool take turns, each round starting with the next one, and "
                    "each row reports the median run, so a machine whose speed drifts favours none of them")
    ap.add_argument("--models", nargs="+", default=["lenet5", "convnet"])
    ap.add_argument("--pools", nargs="+", default=["max", "mean"], choices=["max", "mean"])
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--scaling-batches", type=int, nargs="*", default=None, help="default 16 32 64 128 256")
    ap.add_argument("--scaling-samples", type=int, default=None,
                    help="samples timed per scaling point (default 1024; --quick: 5 steps)")
    ap.add_argument("--filter-scales", type=float, nargs="*", default=[0.5, 1.0, 2.0],
                    help="convnet filter counts ×these (default 0.5 1 2: 16/32, 32/64, 64/128)")
    ap.add_argument("--threads", type=int, default=None, help="threads for every backend (default: all cores)")
    ap.add_argument("--data-root", default="data", help="data.root for Fashion-MNIST (default: data, as train.py)")
    ap.add_argument("--limit-train", type=int, default=None, help="data.limit_train (tests: a small split)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["epochs", "kernels", "scaling", "startup"])
    ap.add_argument("--startup-rounds", type=int, default=None, help="warm start-up runs (default 2; quick 1)")
    ap.add_argument("--readme", default=None, help="also write the README's benchmark section (the headline table, "
                    "the machine, the command) into this file: between its '<!-- bench:start -->' and "
                    "'<!-- bench:end -->' lines if it has them (README.md), else the whole file")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        kind, spec = args.worker
        result = WORKERS[kind](json.loads(spec))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    from cnnpipe import ConfigError
    from cnnpipe.backends import set_threads
    threads = set_threads(args.threads)
    data_root = str(Path(args.data_root).expanduser().resolve())
    bs = args.batch_size
    steps = args.steps
    if args.epochs_fraction is not None:
        steps = max(1, math.ceil(args.epochs_fraction * math.ceil((args.limit_train or 60000) / bs)))
    if args.quick and steps is None:
        steps = 20
    scale_batches = args.scaling_batches if args.scaling_batches is not None else (
        [bs] if args.quick else [16, 32, 64, 128, 256])
    scale_samples = args.scaling_samples or (5 * max(scale_batches or [bs]) if args.quick else 1024)
    base = {"data_root": data_root, "threads": threads, "limit_train": args.limit_train}
    report = {"command": "python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(threads), "load_avg_start": load_avg(), "batch_size": bs,
              "headline_steps": steps or "full epoch", "row_budget_s": args.row_budget or None,
              "warmup_steps": WARMUP_STEPS, "targets": {
                  f"{m}/{b}": t for (m, b), t in TARGETS.items()}, "epochs": [], "kernels": {}, "scaling": {}}
    t_start = time.perf_counter()
    _check_data(data_root, args.limit_train)

    rounds = max(1, args.rounds or (1 if args.quick else 3))
    report["rounds"] = rounds
    if "epochs" not in args.skip:
        for model in args.models:
            for pool in args.pools:
                runs = {b: [] for b in args.backends}
                for k in range(rounds):
                    i = k % len(args.backends)
                    for backend in args.backends[i:] + args.backends[:i]:      # take turns: round k starts later
                        spec = {**base, "model": model, "pool": pool, "backend": backend, "batch_size": bs,
                                "steps": steps, "budget_s": args.row_budget or None}
                        r = run_worker("train", spec, timeout=900)
                        run = {"model": model, "pool": pool, "backend": backend, **r.get("result", {}),
                               **({"error": r["error"]} if "error" in r else {})}
                        runs[backend].append(run)
                        _say(_epoch_line(run) + f" (round {k + 1}/{rounds}, {r.get('wall_s', 0):.0f} s wall)")
                report["epochs"] += [_median_run(runs[b]) for b in args.backends]
        _add_ratios(report["epochs"])

    if "kernels" not in args.skip:
        for backend in args.backends:
            spec = {**base, "backend": backend, "models": args.models, "batch_size": bs,
                    "min_time": 0.02 if args.quick else 0.3}
            r = run_worker("kernels", spec, timeout=600)
            report["kernels"][backend] = r.get("result") or {"error": r["error"]}
            _say(f"kernels {backend}: " + (f"done ({r['wall_s']:.0f} s wall)" if "result" in r else r["error"]))

    if "scaling" not in args.skip:
        points = [{"sweep": "batch", "model": m, "pool": "max", "batch_size": b} for m in args.models
                  for b in scale_batches]
        if "convnet" in args.models:
            points += [{"sweep": "filters", "model": "convnet", "pool": "max", "batch_size": bs,
                        "filters": [max(1, round(32 * s)), max(1, round(64 * s))]} for s in args.filter_scales]
        for backend in args.backends:
            spec = {**base, "backend": backend, "points": points, "samples": scale_samples}
            r = run_worker("scaling", spec, timeout=900)
            report["scaling"][backend] = r.get("result") or {"error": r["error"]}
            _say(f"scaling {backend}: " + (f"done ({r['wall_s']:.0f} s wall)" if "result" in r else r["error"]))
        report["scaling_samples"] = scale_samples

    if "startup" not in args.skip:
        rounds = args.startup_rounds or (1 if args.quick else 2)
        extra = ["data.val_size=0", f"data.limit_train={args.limit_train}"] if args.limit_train else []
        report["startup"] = startup_section(data_root, rounds, cold=not args.quick, extra=extra)
        _say(f"start-up: {json.dumps({k: v for k, v in report['startup'].items() if k != 'numba_warm_runs'})}")

    report["load_avg_end"] = load_avg()
    report["total_seconds"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = render_markdown(report)
    out.with_suffix(".md").write_text(md)
    if args.readme:
        write_readme_section(Path(args.readme), render_readme(md, out.with_suffix(".md")))
    print(md)
    failed = [r for r in report["epochs"] if "error" in r]
    if failed:
        raise ConfigError(f"{len(failed)} benchmark configuration(s) failed: "
                          + "; ".join(f"{r['model']}/{r['pool']}/{r['backend']}: {r['error']}" for r in failed))
    return 0


def _check_data(data_root, limit_train):
    """Load the data once up front, so that a missing dataset is one clear error, not twelve failed workers."""
    from omegaconf import OmegaConf
    from cnnpipe.data import load_data
    cfg = OmegaConf.create({"name": "fashion_mnist", "root": data_root, "val_size": 0, "limit_train": limit_train,
                            "download": True})
    load_data(cfg, SEED)


def _say(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _epoch_line(r):
    if "error" in r:
        return f"{r['model']}/{r['pool']}/{r['backend']}: FAILED {r['error']}"
    return (f"{r['model']}/{r['pool']}/{r['backend']}: {r['seconds_per_epoch']:.2f} s/epoch, "
            f"{r['samples_per_s']:.0f} samples/s, {r['steps']} steps, peak RSS {r['peak_rss_mb']:.0f} MB")


def _median_run(runs):
    """One row for a configuration's runs: the median run (by s/epoch; the lower middle one of an even count), with
    every run's s/epoch beside it and the highest peak RSS; failed if any run failed."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    ranked = sorted(runs, key=lambda r: r["seconds_per_epoch"])
    row = dict(ranked[(len(ranked) - 1) // 2])
    row["runs_seconds_per_epoch"] = [r["seconds_per_epoch"] for r in runs]
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return row


def _add_ratios(rows):
    ref = {(r["model"], r["pool"]): r["seconds_per_epoch"] for r in rows
           if r["backend"] == "torch" and "error" not in r}
    for r in rows:
        t = ref.get((r["model"], r["pool"]))
        if t and "error" not in r:
            r["ratio_to_torch"] = r["seconds_per_epoch"] / t
            target = TARGETS.get((r["model"], r["backend"]))
            if target is not None:
                r["target"], r["meets_target"] = target, r["ratio_to_torch"] <= target


# ---------------------------------------------------------------------------------------------------------------
# markdown

def _table(header, rows, left=1):
    """A markdown table; the first `left` columns are text (left-aligned), the rest numbers."""
    align = ["---" if i < left else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def write_readme_section(path, section):
    """Replace what lies between the README's bench markers with `section` (no markers: write the file)."""
    text = path.read_text() if path.exists() else ""
    if README_START in text and README_END in text.split(README_START, 1)[1]:
        before, rest = text.split(README_START, 1)
        after = rest.split(README_END, 1)[1]
        path.write_text(f"{before}{README_START}\n{section}{README_END}{after}")
    else:
        path.write_text(section)


def render_readme(md, md_path):
    """The README's section: the machine line, the training-epoch table, the start-up table and the command."""
    parts = md.split("\n## ")
    head = parts[0].split("\n", 2)[2].strip()                        # machine, warning, command
    keep = [p for p in parts[1:] if p.startswith(("Training epochs", "Start-up"))]
    body = "\n\n".join("#### " + p.strip() for p in keep)
    js = md_path.with_suffix(".json")
    return (f"### Results: numpy and numba beside PyTorch\n\n{head}\n\n{body}\n\nPer-kernel times and how the cost "
            f"grows with batch size and filter count: [{md_path.as_posix()}]({md_path.as_posix()}) (all numbers: "
            f"[{js.as_posix()}]({js.as_posix()})).\n")


def render_markdown(rep):
    m = rep["machine"]
    out = ["# Benchmark: numpy and numba backends beside PyTorch", ""]
    out.append(f"Measured {m['date']} on {m.get('cpu', '?')} ({m['cpus']} cores; threads for every backend: "
               f"{m['threads']}; "
               f"{', '.join(m.get('simd', []))}; {m.get('mem_gb', '?')} GB), {m['platform']}, Python "
               f"{m['python']}, numpy {m['numpy']}, numba {m['numba']}, torch {m['torch']}; BLAS: "
               f"{'; '.join(m.get('blas', [])) or '?'}. Environment: "
               f"{', '.join(f'{k}={v}' for k, v in m['env'].items()) or 'no BLAS/thread variables set'}. "
               f"Load average at start {rep['load_avg_start']}, at end {rep.get('load_avg_end')}.")
    start = (rep["load_avg_start"] or [0])[0]         # the end's load average counts the benchmark's own processes
    if start > 0.5 * m["cpus"]:
        out += ["", f"**Warning: the machine was busy** (1-minute load average {start:.1f} on {m['cpus']} cores "
                "before the benchmark started): multi-threaded timings suffer badly when another process holds a "
                "core (every thread barrier waits for a time slice). Rerun on a quiet machine for fair numbers."]
    out += ["", f"Command: `{rep['command']}` ({rep.get('total_seconds', 0):.0f} s in all).", ""]
    if rep["epochs"]:
        full = all(r.get("full_epoch") for r in rep["epochs"] if "error" not in r)
        out += ["## Training epochs", "",
                f"Fashion-MNIST, 60,000 training images, batch {rep['batch_size']}, float32, SGD lr 0.05 momentum "
                f"0.9; training loop only (batch preparation, forward, softmax-CE, backward, optimizer step), after "
                f"{rep['warmup_steps']} untimed warm-up steps. "
                + ("Full epochs." if full else "Full epochs except the rows marked *: those stopped after "
                   + (f"{rep['headline_steps']} steps" if rep["headline_steps"] != "full epoch" else "")
                   + (" or " if rep["headline_steps"] != "full epoch" and rep.get("row_budget_s") else "")
                   + (f"{rep['row_budget_s']:.0f} s" if rep.get("row_budget_s") else "")
                   + ", and their epoch time is extrapolated from the steps done (steps column).")
                + (f" Each configuration ran {rep['rounds']} times, the three backends taking turns (each round "
                   "starting with the next backend); a row is the median run, the runs column lists every run's "
                   "s/epoch in order, and the ratio is between medians." if rep.get("rounds", 1) > 1 else "")
                + " Every run is its own process; peak RSS is the highest maximum resident set of its runs (it "
                "includes the imported torch/torchvision, which the data loader needs for every backend).", ""]
        rows = []
        for r in rep["epochs"]:
            name = [r["model"], r["pool"], r["backend"]]
            if "error" in r:
                rows.append([*name, "failed", "", "", "", "", "", "", "", r["error"][:80]])
                continue
            star = "" if r["full_epoch"] else "*"
            ratio = f"{r['ratio_to_torch']:.2f}×" if "ratio_to_torch" in r else ""
            target = ""
            if "target" in r:
                target = f"≤ {r['target']:.1f}× {'✅' if r['meets_target'] else '❌'}"
            elif r["backend"] != "torch":
                target = "—"
            rss = f"{r['peak_rss_mb']:.0f}"
            if r["model"] in RSS_TARGET_MB:
                limit = RSS_TARGET_MB[r["model"]]
                rss += f" (≤ {limit} {'✅' if r['peak_rss_mb'] <= limit else '❌'})"
            runs = " / ".join(f"{v:.1f}" for v in r.get("runs_seconds_per_epoch", [r["seconds_per_epoch"]]))
            rows.append([*name, f"{r['seconds_per_epoch']:.2f}{star}", runs, f"{r['samples_per_s']:,.0f}", ratio,
                         target, rss, r["steps"], f"{r['loss_mean']:.3f}"])
        out += [_table(["model", "pool", "backend", "s/epoch", "runs", "samples/s", "× PyTorch", "target",
                        "peak RSS MB", "steps", "mean loss"], rows, left=3), ""]
        out.append("The mean training loss over the timed steps shows that the three train the same network from the "
                   "same weights on the same batches (convnet: up to its dropout masks, which differ).")
        spreads = [max(v) / min(v) - 1 for r in rep["epochs"] if len(v := r.get("runs_seconds_per_epoch", [])) > 1]
        if spreads:
            out += ["", f"Runs of one configuration differed by up to {100 * max(spreads):.0f} % (median "
                    f"{100 * statistics.median(spreads):.0f} %) between their fastest and slowest run on this "
                    "machine, so a ratio within about that margin of its target settles nothing either way."]
        out.append("")
    if any(isinstance(v, list) for v in rep["kernels"].values()):
        out += ["## Kernels", "", f"Median time of one call, batch {rep['batch_size']}, float32, on random data; "
                "torch: `F.conv2d` / `F.max_pool2d` / `F.avg_pool2d` forward under `no_grad`, backward through "
                "`torch.autograd.grad` on a kept graph. Conv backward computes dx, dW, db (the first layer: dW, db "
                "only, as in training).", ""]
        k = {b: {(r["model"], r["layer"], r["op"]): r["ms"] for r in v} for b, v in rep["kernels"].items()
             if isinstance(v, list)}
        order = next(iter(rep["kernels"].values()))
        keys = [(r["model"], r["layer"], r["op"]) for r in (order if isinstance(order, list) else [])]
        bk = [b for b in BACKENDS if b in k]
        header = (["model", "layer", "op"] + [f"{b} ms" for b in bk]
                  + [f"{b} / torch" for b in bk if b != "torch" and "torch" in k])
        rows = []
        for key in keys:
            row = list(key) + [f"{k[b].get(key, float('nan')):.3f}" for b in bk]
            if "torch" in k:
                row += [f"{k[b][key] / k['torch'][key]:.2f}×" for b in bk if b != "torch" and key in k[b]]
            rows.append(row)
        out += [_table(header, rows, left=3), ""]
        for b, v in rep["kernels"].items():
            if not isinstance(v, list):
                out.append(f"kernels {b}: {v['error']}")
    if rep["scaling"]:
        out += ["## Scaling", "", f"Time per sample (µs) of the training loop, {rep.get('scaling_samples')} samples "
                "timed per point (not a full epoch) after the warm-up steps; max pool. The second table: convnet "
                f"at batch {rep['batch_size']} with its two conv layers' filter counts halved and doubled.", ""]
        good = {b: v for b, v in rep["scaling"].items() if isinstance(v, list)}
        bk = [b for b in BACKENDS if b in good]
        for sweep, label in (("batch", "batch"), ("filters", "filters (conv1/conv2)")):
            pts = [p for p in next(iter(good.values()), []) if p["sweep"] == sweep]
            if not pts:
                continue
            rows = []
            for i, p in enumerate(pts):
                vals = {b: [q for q in good[b] if q["sweep"] == sweep][i]["us_per_sample"] for b in bk}
                key = p["batch_size"] if sweep == "batch" else "/".join(map(str, p["filters"]))
                row = [p["model"], key] + [f"{vals[b]:.1f}" for b in bk]
                if "torch" in vals:
                    row += [f"{vals[b] / vals['torch']:.2f}×" for b in bk if b != "torch"]
                rows.append(row)
            header = ["model", label] + [f"{b} µs/sample" for b in bk] + [f"{b} / torch" for b in bk
                                                                          if b != "torch" and "torch" in bk]
            out += [_table(header, rows, left=1 if sweep == "batch" else 2), ""]
        for b, v in rep["scaling"].items():
            if not isinstance(v, list):
                out.append(f"scaling {b}: {v['error']}")
    s = rep.get("startup")
    if s:
        out += ["## Start-up", "", "`python scripts/train.py backend=numba` (default lenet5, Fashion-MNIST) from "
                "launch "
                "to its first finished training step (seen as the trainer's `step 1` debug line: "
                "`trainer.max_steps=1 trainer.log_every=1 hydra.verbose=cnnpipe`). "
                + ("Cold: a fresh, empty `NUMBA_CACHE_DIR`, so every kernel compiles; warm: the same directory "
                   "again" if "numba_cold" in s else "Warm only (--quick): numba's default cache")
                + f" (best of {len(s.get('numba_warm_runs', []))}). Columns: seconds to the model summary (imports, "
                "Hydra), to the data line (plus numba warm-up and data loading), to the first step.", ""]
        rows = []
        for key, label in (("numba_cold", "numba, cold cache"), ("numba_warm", "numba, warm cache"),
                           ("numpy", "numpy (for reference)")):
            if key not in s:
                continue
            r = s[key]
            if "error" in r:
                rows.append([label, "failed", "", "", r["error"][:80]])
                continue
            target = ""
            if key == "numba_warm":
                ok = r["to_first_step_s"] <= WARM_START_TARGET_S
                target = f"≤ {WARM_START_TARGET_S:.0f} s {'✅' if ok else '❌'}"
            f = lambda v: "" if v is None else f"{v:.2f}"
            rows.append([label, f(r.get("to_model_s")), f(r.get("to_data_s")), f(r["to_first_step_s"]), target])
        out += [_table(["run", "to model s", "to data s", "to first step s", "target"], rows), ""]
        if "cold_compile_s" in s:
            out.append(f"Cold compile time (cold − warm, to the first step): {s['cold_compile_s']:.1f} s; "
                       f"{s['cache_files']} cache files written.")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # a ConfigError: one paragraph, non-zero exit
        from cnnpipe import ConfigError
        if not isinstance(e, ConfigError):
            raise
        from cnnpipe.cli import fail
        fail(str(e))
