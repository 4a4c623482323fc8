"""The environment a benchmark ran in: versions, GPU, clocks (NVML, read only), and the device
slug that names the result files."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from bench.common import is_cuda

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["git_commit", "nvml_info", "environment", "device_slug", "utc_now"]

# Words of a GPU name that say nothing about the chip.
_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct"}


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def git_commit() -> str | None:
    """Short commit of the checkout (``None`` outside git, e.g. a copied tree)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def nvml_info(index: int = 0) -> dict[str, object]:
    """GPU name, clocks, memory, driver, power limit, temperature via nvidia-ml-py (read only).
    Never raises: a refused call leaves its key ``None``, a refused init/handle one note."""
    try:
        import pynvml
    except Exception as e:
        return {"nvml": f"unavailable ({type(e).__name__}: {e})"}
    info: dict[str, object] = {}
    try:
        pynvml.nvmlInit()
    except Exception as e:
        return {"nvml": f"init failed ({e})"}
    try:
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:  # e.g. NVML's numbering differs from CUDA's, or a sandbox refuses it
            return {"nvml": f"no handle for device {index} ({type(e).__name__}: {e})"}

        def q(key, fn):
            try:
                v = fn()
                info[key] = v.decode() if isinstance(v, bytes) else v
            except Exception:
                info[key] = None

        q("name", lambda: pynvml.nvmlDeviceGetName(h))
        q("driver", pynvml.nvmlSystemGetDriverVersion)
        q("cuda_driver_version", pynvml.nvmlSystemGetCudaDriverVersion)
        q("memory_total_gib", lambda: pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30)
        q("memory_used_gib", lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**30)
        q("sm_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM))
        q("mem_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM))
        q("sm_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM))
        q("mem_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM))
        q("power_limit_w", lambda: pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000.0)
        q("temperature_c", lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
        q("persistence_mode", lambda: pynvml.nvmlDeviceGetPersistenceMode(h))
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return info


def environment(device: str) -> dict[str, object]:
    """Versions, the checkout's commit and, on CUDA, the GPU and its NVML readings."""
    env: dict[str, object] = {
        "date_utc": utc_now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "git_commit": git_commit(),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except Exception as e:
        env["transformers"] = f"unavailable ({e})"
    try:
        import earlytom_ext
        from earlytom_ext import _ext

        env["earlytom_ext"] = earlytom_ext.__version__
        env["earlytom_ops_compiled"] = _ext.available()
        env["earlytom_cuda_kernels"] = _ext.has_cuda_kernels()
    except Exception as e:
        env["earlytom_ext"] = f"unavailable ({e})"
    if is_cuda(device):
        idx = torch.device(device).index or 0
        p = torch.cuda.get_device_properties(idx)
        env["gpu"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "sms": p.multi_processor_count,
            "memory_gib": p.total_memory / 2**30,
        }
        env["nvml"] = nvml_info(idx)
    return env


def device_slug(device: str, name: str | None = None) -> str:
    """Short name of the device for file names: ``h100`` for "NVIDIA H100 80GB HBM3", ``h200``,
    ``a100`` for "NVIDIA A100-SXM4-80GB", ``rtx-4090``; ``cpu-smoke`` off CUDA."""
    if not is_cuda(device):
        return "cpu-smoke"
    if name is None:
        name = torch.cuda.get_device_name(torch.device(device).index or 0)
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in _VENDOR_WORDS]
    if not words:
        return "cuda"
    if any(c.isdigit() for c in words[0]):
        return words[0]
    return "-".join(words[:2])
