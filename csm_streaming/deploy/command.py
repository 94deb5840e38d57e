"""A rented GPU box (vast.ai and alike) from bare to benchmarked in one command.

    python deploy_vast.py --all              # setup, download, benchmark, acceptance
    python deploy_vast.py --all --local --model random:tiny   # the same on this machine, fast
    python deploy_vast.py --info         # GPU, driver, CUDA, torch, memory, disk: can it run?
    python deploy_vast.py --setup        # system packages + the Python environment (the README's)
    python deploy_vast.py --download     # CSM-1B, tokenizer, Mimi, watermark (HF_TOKEN if set)
    python deploy_vast.py --benchmark    # benchmarks/ -> results/<device>-<date>/ (JSON, PNG)
    python deploy_vast.py --serve        # the server, stream slots fitted to the GPU's memory
    python deploy_vast.py --serve --replicas 4   # one engine per GPU, on Ray Serve
    python deploy_vast.py --all --dry-run    # print what would run

Every step says what it does and can be re-run safely. This package (started by deploy_vast.py)
imports no model code: model work runs in the project's virtual
environment (.venv) as subprocesses. Secrets never reach the
output: the value of HF_TOKEN (and of any --token) is masked in everything printed.
"""
# Standard library only at import: it runs before the project's environment exists.

from __future__ import annotations

import argparse
import json
import os

from csm_streaming.deploy.acceptance import failing_goals, step_acceptance
from csm_streaming.deploy.machine import collect_info, step_info
from csm_streaming.deploy.runner import DEFAULT_MODEL, Runner
from csm_streaming.deploy.steps import step_benchmark, step_download, step_serve, step_setup


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Set up, download, benchmark and serve CSM-1B on a GPU box.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--info", action="store_true", help="GPU, driver, torch, memory, disk: can it run CSM-1B?"
    )
    p.add_argument("--setup", action="store_true", help="bash setup.sh, then check that CUDA works")
    p.add_argument("--download", action="store_true",
                   help="weights, tokenizer, Mimi and the watermark model into the HF cache")
    p.add_argument(
        "--benchmark",
        action="store_true",
        help="the benchmarks/ suite with random full-size weights -> results/<gpu>-<date>/",
    )
    p.add_argument(
        "--serve", action="store_true", help="the server, slots fitted to the GPU memory"
    )
    p.add_argument("--all", action="store_true",
                   help="info, setup, download, benchmark, acceptance (goal vs measured)")
    p.add_argument("--local", action="store_true",
                   help="with --all: this machine as it is (no setup, no download), e.g. "
                        "--all --local --model random:tiny checks the script on a CPU")
    p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="repo, folder or random:tiny / random:csm-1b"
    )
    p.add_argument("--device", default=None, help="None: cuda when it works, else cpu")
    p.add_argument(
        "--quick", action="store_true", help="short benchmarks (always with random:tiny)"
    )
    p.add_argument("--no-watermark-download", action="store_true",
                   help="do not download the watermark model")
    p.add_argument("--host", default="127.0.0.1", help="address --serve binds")
    p.add_argument("--port", type=int, default=8000, help="port --serve listens on")
    p.add_argument("--token", default=os.environ.get("CSM_SERVER_TOKEN"),
                   help="bearer token for --serve (or $CSM_SERVER_TOKEN)")
    p.add_argument("--replicas", type=int, default=1,
                   help="--serve: engines on Ray Serve, one per GPU (1: the plain server)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    steps = [s for s in ("info", "setup", "download", "benchmark", "serve") if getattr(args, s)]
    if args.all:
        steps = ["info", "benchmark", "acceptance"] if args.local else [
            "info", "setup", "download", "benchmark", "acceptance"]
    if not steps:
        p.print_help()
        return 2
    r = Runner(dry_run=args.dry_run, secrets=[os.environ.get("HF_TOKEN", ""), args.token or ""])
    if args.dry_run:
        r.say("(dry run: printing the steps, running nothing)")
    info = step_info(r) if "info" in steps else None
    if "setup" in steps:
        step_setup(r)
    benchmark_model = args.model
    if "download" in steps:
        step_download(r, args.model, watermark=not args.no_watermark_download)
    if "benchmark" in steps:
        info = info or collect_info()
        device = args.device or (
            "cuda" if info["gpus"] and info["torch"].get("cuda_available", True) else "cpu"
        )
        if not benchmark_model.startswith("random:"):
            benchmark_model = "random:csm-1b"  # speed does not depend on the weights
        if device == "cpu" and not info["gpus"]:
            r.say("no GPU: benchmarking on the CPU")
        quick = args.quick or benchmark_model == "random:tiny"
        out = step_benchmark(r, benchmark_model, device, quick=quick)
        if "acceptance" in steps:
            real = None if args.model.startswith("random:") else args.model
            path = step_acceptance(r, out, benchmark_model, device, quick, real_model=real)
            if path is not None:
                failing = failing_goals(json.loads(path.read_text())["goals"])
                for line in failing:
                    r.say(f"FAILED: {line}")
                if failing:
                    r.say(f"acceptance: {len(failing)} goal(s) failed: exit 1")
                    return 1
    if "serve" in steps:
        step_serve(r, args.model, args.host, args.port, args.token, args.replicas)
    return 0
