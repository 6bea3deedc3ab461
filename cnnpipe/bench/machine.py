"""What the benchmark ran on: CPU, cores, memory, library versions, BLAS, the thread/BLAS environment, the load."""
from __future__ import annotations

import os
import platform
import time

ENV_KEYS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS")


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": platform.processor(), "simd": []}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read().splitlines()
        names = [line.split(":", 1)[1].strip() for line in text if line.startswith("model name")]
        flags = next((line.split(":", 1)[1].split() for line in text if line.startswith("flags")), [])
        info["cpu"] = names[0] if names else info["cpu"]
        info["simd"] = [f for f in ("avx2", "fma", "avx512f") if f in flags]
        with open("/proc/meminfo") as f:
            info["mem_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    for mod in ("numpy", "numba", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        from threadpoolctl import threadpool_info
        info["blas"] = sorted({f"{d.get('internal_api')} {d.get('version')} ({d.get('architecture')})"
                               for d in threadpool_info() if d.get("user_api") == "blas"})
    except ImportError:
        info["blas"] = []
    info["gemm"] = _kernels_gemm()
    info["env"] = {k: os.environ[k] for k in ENV_KEYS if k in os.environ}
    return info


def _kernels_gemm() -> str:
    """The library the numba backend's kernels take their GEMM from, with the mkl wheel's version when it is MKL."""
    from cnnpipe import ConfigError
    try:
        from cnnpipe.backends.numba import runtime
        name = os.path.basename(runtime.gemm_library())
    except (ImportError, ConfigError):                   # numba missing, or no BLAS: the report says "?"
        return "?"
    if "mkl" in name:
        from importlib import metadata
        name += f" (mkl {metadata.version('mkl')}, sequential)"
    return name


def load_avg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None
