"""What the box is: GPUs, driver, CUDA, torch, memory, disk, and whether CSM-1B fits.

Standard library only at import: it runs before the project's environment exists."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

from csm_streaming.deploy.runner import MIN_GPU_GB, ROOT, STREAM_GB, VENV_PY, Runner


def gpu_info() -> list[dict]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,memory.free",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            gpus.append(
                {
                    "name": parts[0],
                    "driver": parts[1],
                    "memory_total_gb": float(parts[2]) / 1024,
                    "memory_free_gb": float(parts[3]) / 1024,
                }
            )
    return gpus


def torch_info() -> dict:
    if not VENV_PY.exists():
        return {"installed": False}
    code = ("import json, torch; print(json.dumps({'installed': True, 'torch': torch.__version__, "
            "'cuda_build': torch.version.cuda, 'cuda_available': torch.cuda.is_available()}))")
    try:
        out = subprocess.run(
            [str(VENV_PY), "-c", code], capture_output=True, text=True, timeout=120
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as e:  # a broken environment: say so, do not crash
        return {"installed": False, "error": f"{type(e).__name__}"}


def memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def collect_info() -> dict:
    gpus = gpu_info()
    disk = shutil.disk_usage(ROOT)
    info = {"host": platform.node(), "os": platform.platform(), "python": platform.python_version(),
            "gpus": gpus, "torch": torch_info(), "ram_free_gb": memory_gb(),
            "disk_free_gb": disk.free / 2**30, "cpu_count": os.cpu_count()}
    if gpus:
        best = max(g["memory_free_gb"] for g in gpus)
        info["can_run"] = best >= MIN_GPU_GB
        info["verdict"] = (
            f"yes: {best:.1f} GB free on the GPU (CSM-1B in bf16 needs about {MIN_GPU_GB} GB)"
            if info["can_run"]
            else f"no: {best:.1f} GB free on the GPU, CSM-1B needs about {MIN_GPU_GB} GB"
        )
    else:
        info["can_run"] = False
        info["verdict"] = ("no GPU: CSM-1B runs on the CPU slower than real time; "
                           "--benchmark --model random:tiny still works")
    if info["disk_free_gb"] < 20:
        info["verdict"] += (
            f"; only {info['disk_free_gb']:.0f} GB of disk free (weights need ~10 GB)"
        )
    return info


def step_info(r: Runner) -> dict:
    r.say("== info: what is this box?")
    info = collect_info()
    if info["gpus"]:
        for g in info["gpus"]:
            r.say(f"GPU: {g['name']}, driver {g['driver']}, {g['memory_free_gb']:.1f} / "
                  f"{g['memory_total_gb']:.1f} GB free")
    else:
        r.say("GPU: none found (no nvidia-smi, or no NVIDIA GPU)")
    t = info["torch"]
    if t.get("installed"):
        r.say(
            f"torch: {t['torch']} (CUDA build {t['cuda_build']}, "
            f"CUDA available: {t['cuda_available']})"
        )
    else:
        r.say("torch: not installed yet (run --setup)")
    ram = info["ram_free_gb"]
    r.say(f"memory free: {ram:.1f} GB" if ram is not None else "memory free: unknown")
    r.say(f"disk free: {info['disk_free_gb']:.1f} GB; CPUs: {info['cpu_count']}")
    r.say(f"can run CSM-1B on the GPU: {info['verdict']}")
    return info


def fitted_streams(info: dict) -> int:
    """Stream slots for the GPU's free memory (at least 1, at most 64); 2 on a CPU."""
    if not info["gpus"]:
        return 2
    free = max(g["memory_free_gb"] for g in info["gpus"])
    return max(1, min(64, int((free - MIN_GPU_GB) / STREAM_GB) + 1))
