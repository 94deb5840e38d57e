"""The steps: setup (the README's install), download (weights, checked), benchmark
(benchmarks/ -> results/<device>-<date>/), serve.

Standard library only at import: it runs before the project's environment exists."""

from __future__ import annotations

import os
import time
from pathlib import Path

from csm_streaming.deploy.machine import collect_info, fitted_streams
from csm_streaming.deploy.report import write_report
from csm_streaming.deploy.runner import ROOT, VENV_PY, Runner


def step_setup(r: Runner):
    r.say("== setup: system packages and the Python environment (bash setup.sh, as in the README)")
    r.run(["bash", "setup.sh"])
    r.say("checking that CUDA works from the environment")
    check = (
        "import torch; ok = torch.cuda.is_available(); "
        "print('CUDA works:', torch.cuda.get_device_name(0), "
        "torch.ones(2, device='cuda').sum().item()) "
        "if ok else print('CUDA is not available to torch: the GPU steps will run on the CPU')"
    )
    r.run([str(VENV_PY), "-c", check])


# Runs in the project's environment: the weight files of a checkpoint are picked by
# csm_streaming.model.hub, the one place that knows them.
DOWNLOAD_SCRIPT = r"""
import os, sys
from csm_streaming.model.checkpoints import MIMI_NAME, MIMI_REPO, download_checkpoint
from huggingface_hub import hf_hub_download, snapshot_download
repo, with_wm = sys.argv[1], sys.argv[2] == "1"
folder = download_checkpoint(repo, progress=lambda line: print(line, flush=True))
paths = [str(p) for p in folder.iterdir() if p.is_file()]
print(f"[mimi] {MIMI_REPO}/{MIMI_NAME}", flush=True)
paths.append(hf_hub_download(MIMI_REPO, MIMI_NAME))
if with_wm:
    from csm_streaming.model.watermark import SILENTCIPHER_44K, SILENTCIPHER_REPO
    print(f"[watermark] {SILENTCIPHER_REPO} ({SILENTCIPHER_44K})", flush=True)
    snapshot_download(SILENTCIPHER_REPO, allow_patterns=[f"{SILENTCIPHER_44K}/*"])
# verify: every file is there, and every safetensors header reads
from safetensors import safe_open
for p in paths:
    assert os.path.getsize(p) > 0, p
    if p.endswith(".safetensors"):
        with safe_open(p, "pt") as f:
            n = len(list(f.keys()))
        print(f"verified {os.path.basename(p)}: {n} tensors", flush=True)
print("download complete", flush=True)
"""


def step_download(r: Runner, model: str, watermark: bool = True):
    if model.startswith("random:"):
        r.say(f"== download: nothing to download for {model} (random weights)")
        return
    r.say(
        f"== download: {model}, Mimi and "
        f"{'the watermark model' if watermark else 'no watermark model'} "
        "into the Hugging Face cache" + (" (using HF_TOKEN)" if os.environ.get("HF_TOKEN") else "")
    )
    r.run([str(VENV_PY), "-c", DOWNLOAD_SCRIPT, model, "1" if watermark else "0"])


def step_benchmark(r: Runner, model: str, device: str, quick: bool) -> Path:
    info = collect_info()
    name = info["gpus"][0]["name"] if info["gpus"] else "cpu"
    out = ROOT / "results" / f"{name.lower().replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    r.say(f"== benchmark: {model} on {device} -> {out.relative_to(ROOT)}")
    if not r.dry_run:
        out.mkdir(parents=True, exist_ok=True)
    # streams long enough to judge real time (a few chunks past the first audio)
    frames = "16" if quick else "125"
    py = str(VENV_PY)
    r.run(
        [
            py,
            "benchmarks/bench_frame.py",
            "--model",
            model,
            "--device",
            device,
            "--frames",
            "3" if quick else "8",
            "--out-dir",
            str(out),
        ]
    )
    r.run(
        [
            py,
            "benchmarks/bench_streaming.py",
            "--model",
            model,
            "--device",
            device,
            "--frames",
            frames,
            "--streams",
            "1,2" if quick else "1,4,8,16" if device == "cpu" else "1,8,32,64,128",
            "--chunks",
            "320" if quick else "160,320,640",
            "--frame-batches",
            "2" if quick else "1,2,4",
            "--repeats",
            "2" if quick else "3",
            "--out-dir",
            str(out),
        ]
        + ([] if quick or device == "cpu" else ["--compile"])
    )
    r.run(
        [
            py,
            "benchmarks/bench_watermark.py",
            "--device",
            device,
            "--repeats",
            "1" if quick else "3",
            "--out-dir",
            str(out),
        ]
    )
    if not r.dry_run:
        report = write_report(out, info, model)
        r.say(f"report: {report.relative_to(ROOT)}")
    return out


def step_serve(r: Runner, model: str, host: str, port: int, token: str | None,
               replicas: int = 1):
    """The server; with replicas > 1, that many engines (one per GPU) on Ray Serve."""
    info = collect_info()
    streams = fitted_streams(info)
    gpus = len(info["gpus"])
    if replicas > 1 and gpus and replicas > gpus:
        raise SystemExit(f"--replicas {replicas}: this box has {gpus} GPUs (one engine each)")
    r.say(f"== serve: {model} on {host}:{port} with {streams} stream slots"
          f"{f' x {replicas} replicas (Ray Serve)' if replicas > 1 else ''} "
          f"({'fitted to the GPU memory' if info['gpus'] else 'CPU'})")
    if replicas > 1:
        cmd = [str(VENV_PY), "-m", "csm_streaming.server.ray_serve", "--replicas", str(replicas),
               "--host", host, "--port", str(port), "--max-streams", str(streams), "--model", model]
    else:
        cmd = [str(VENV_PY), "-m", "csm_streaming.server.app", "--model", model, "--host", host,
               "--port", str(port), "--max-streams", str(streams), "--max-queue", str(streams * 4)]
    env = dict(os.environ)
    if token:
        env["CSM_SERVER_TOKEN"] = token  # through the environment: not on the command line
    r.run(cmd, env=env)
