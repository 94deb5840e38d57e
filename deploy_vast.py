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

Every step says what it does and can be re-run safely. This file imports no model code: model
work runs in the project's virtual environment (.venv) as subprocesses. Secrets never reach the
output: the value of HF_TOKEN (and of any --token) is masked in everything printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
DEFAULT_MODEL = "unsloth/csm-1b"  # checkpoints.DEFAULT_REPO (this file imports no model code)
MIN_GPU_GB = 8  # bf16 weights 3.1 GB + Mimi + caches and activations for a few streams
# per extra stream: backbone KV cache at 2048 positions (bf16) + Mimi state + margin
STREAM_GB = 0.15


@dataclass
class Runner:
    dry_run: bool = False
    secrets: list[str] = field(default_factory=list)

    def mask(self, text: str) -> str:
        for s in self.secrets:
            if s:
                text = text.replace(s, s[:3] + "***" if len(s) > 6 else "***")
        return text

    def say(self, msg: str):
        print(self.mask(msg), flush=True)

    def run(
        self, cmd: list[str], check: bool = True, env: dict | None = None, capture: bool = False
    ):
        """Run a command (or print it in a dry run); its output streams through, masked."""
        self.say(f"$ {' '.join(shlex.quote(c) for c in cmd)}")
        if self.dry_run:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if not capture:
                print(self.mask(line), end="", flush=True)
        proc.wait()
        out = "".join(lines)
        if check and proc.returncode != 0:
            raise SystemExit(f"step failed (exit {proc.returncode}): {self.mask(' '.join(cmd))}\n"
                             + self.mask(out[-2000:]))
        return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


# ---------------------------------------------------------------------------------------------
# --info
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# --setup, --download
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# --benchmark
# ---------------------------------------------------------------------------------------------


def step_benchmark(r: Runner, model: str, device: str, quick: bool) -> Path:
    info = collect_info()
    name = info["gpus"][0]["name"] if info["gpus"] else "cpu"
    out = ROOT / "results" / f"{name.lower().replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    r.say(f"== benchmark: {model} on {device} -> {out.relative_to(ROOT)}")
    if not r.dry_run:
        out.mkdir(parents=True, exist_ok=True)
    # streams long enough to judge real time (a few chunks past the first audio)
    frames = "32" if quick else "125"
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


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _spread(row: dict, key: str, fmt: str = ".0f", spread_key: str | None = None) -> str:
    """A figure as 'median (min-max, n runs)' when its runs were kept, else the figure."""
    sp = (row.get("spread") or {}).get(key) or row.get(spread_key or "")
    if not sp:
        return format(row[key], fmt)
    runs = "1 run" if sp["n"] == 1 else f"{sp['n']} runs"
    return f"{sp['median']:{fmt}} ({sp['min']:{fmt}}-{sp['max']:{fmt}}, {runs})"


WATERMARK_MS_PER_AUDIO_S_CPU = 300  # the README's figure for a 2-core CPU


def contradictions(frame: dict | None, streaming: dict | None, wm: dict | None,
                   on_cpu: bool) -> list[str]:
    """Figures that cannot all be right, or that are far from what the README says: a busy
    machine, a broken install or a regression. Each is one line to read before trusting the
    report."""
    found = []
    rows = sorted((r for r in (streaming or {}).get("rows", []) if r.get("kind") == "streams"),
                  key=lambda r: r["streams"])
    for fewer, more in zip(rows, rows[1:]):
        if more["aggregate_frames_per_s"] < 0.95 * fewer["aggregate_frames_per_s"]:
            found.append(f"{more['name']} make fewer frames per second than {fewer['name']} "
                         f"({more['aggregate_frames_per_s']:.1f} vs "
                         f"{fewer['aggregate_frames_per_s']:.1f}): batching should never lose")
    steps = {r["dtype"]: r["ours_ms"] for r in (frame or {}).get("rows", [])}
    if "fp32" in steps and "bf16" in steps:
        ratio = steps["fp32"] / steps["bf16"]
        if not 1 / 3 <= ratio <= 3:
            found.append(f"the fp32 step is {ratio:.1f}x the bf16 step ({steps['fp32']:.1f} vs "
                         f"{steps['bf16']:.1f} ms): expected within 3x either way")
    for r in (wm or {}).get("rows", []):
        if on_cpu and r["window_ms"] == 2000:
            ratio = r["ms_per_audio_s"] / WATERMARK_MS_PER_AUDIO_S_CPU
            if not 1 / 3 <= ratio <= 3:
                found.append(f"the watermark costs {r['ms_per_audio_s']:.0f} ms per audio "
                             f"second, {ratio:.1f}x the README's {WATERMARK_MS_PER_AUDIO_S_CPU}")
    for source in (frame, streaming, wm):
        for r in (source or {}).get("rows", []):
            spreads = dict(r.get("spread") or {})
            if r.get("ours_spread_ms"):
                spreads["ours_ms"] = r["ours_spread_ms"]
            for key, sp in spreads.items():
                if sp["n"] > 1 and sp["min"] > 0 and sp["max"] > 1.5 * sp["min"]:
                    found.append(f"{r.get('name') or r.get('dtype') or r.get('window_ms')}: "
                                 f"{key} varies {sp['max'] / sp['min']:.1f}x over {sp['n']} runs "
                                 "(a busy machine?)")
    return found


def write_report(out: Path, info: dict, model: str) -> Path:
    """A short markdown report of the JSON the benchmarks wrote: each figure with its spread
    where the benchmark kept its runs, then the figures that contradict each other."""
    gpu = info["gpus"][0] if info["gpus"] else None
    box = f", {gpu['name']} ({gpu['memory_total_gb']:.0f} GB)" if gpu else ""
    lines = [f"# CSM-1B benchmark on {_device(out)}", "",
             f"Model: {model} (random weights: speed does not depend on their values). "
             f"Date: {time.strftime('%Y-%m-%d %H:%M')}. Box: {info['cpu_count']} CPUs{box}.", ""]
    frame = _load(out, "frame_")
    if frame:
        lines += ["## Frame step", "", f"Read bandwidth {frame['bandwidth_gb_s']:.1f} GB/s.", ""]
        lines += _table(["dtype", "floor ms", "ours ms", "plain loop ms", "ours / floor", "RTF"],
                        [[r["dtype"], f"{r['floor_ms']:.1f}",
                          _spread(r, "ours_ms", ".1f", "ours_spread_ms"),
                          f"{r['plain_ms']:.1f}", f"{r['ours_over_floor']:.2f}",
                          f"{r['ours_rtf']:.3f}"] for r in frame["rows"]])
    streaming = _load(out, "streaming_")
    if streaming:
        runs = [r for r in streaming["rows"] if "step_ms" not in r]
        steps = [r for r in streaming["rows"] if "step_ms" in r]
        lines += ["## Streaming", ""]
        lines += _table(["run", "streams", "first audio ms", "RTF per stream", "frames/s (all)"],
                        [[r["name"], str(r["streams"]), _spread(r, "ttfa_ms"),
                          _spread(r, "rtf_per_stream", ".3f"),
                          _spread(r, "aggregate_frames_per_s", ".2f")] for r in runs])
        if steps:
            lines += _table(["frame step alone", "ms", "frames/s (all)", "vs 1 stream"],
                            [[r["name"].removeprefix("frame step, "), _spread(r, "step_ms", ".1f"),
                              f"{r['aggregate_frames_per_s']:.2f}",
                              f"{r['aggregate_vs_1_stream']:.2f}x"] for r in steps])
        lines += [f"![streaming]({p.name})" for p in sorted(out.glob("streaming_*.png"))] + [""]
    wm = _load(out, "watermark_")
    if wm:
        lines += ["## Watermark", "",
                  f"Added to the first audio: {wm['first_chunk_added_latency_ms']:.0f} ms.", ""]
        lines += _table(["window ms", "mark ms", "ms per audio second"],
                        [[str(r["window_ms"]), _spread(r, "mark_ms"), f"{r['ms_per_audio_s']:.0f}"]
                         for r in wm["rows"]])
    warnings = contradictions(frame, streaming, wm, on_cpu=gpu is None)
    lines += ["## Checks", ""] + ([f"- warning: {w}" for w in warnings] or
                                  ["- no figure contradicts another"]) + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    for w in warnings:
        print(f"warning: {w}")
    return path


# ---------------------------------------------------------------------------------------------
# Acceptance: the GPU tests, quantization and a server load test, then goal vs measured
# ---------------------------------------------------------------------------------------------

# (goal, bound, which side is good): the speed claims of the README, on the GPU they were
# made for
GOALS = {
    "step_over_floor": ("one stream's frame step <= 1.5x the bandwidth floor", 1.5, "max"),
    "frame_step_ms": ("one stream's frame step <= 80 ms (faster than the audio)", 80.0, "max"),
    "first_audio_ms": ("first audio <= 100 ms after warm-up (one stream)", 100.0, "max"),
    "realtime_streams": (">= 128 streams each faster than real time (an H100)", 128, "min"),
    "int8_vs_bf16": ("int8 faster than bf16 per frame", 1.0, "min"),
    "int8_top1": ("int8's next codes agree with bf16's >= 90% (top-1; KL beside it)", 0.9, "min"),
}
# A run on a CPU is judged against bounds of its own (what a 2-core machine does), marked as
# such, so that it too can pass or fail: the GPU's bounds would fail every CPU run.
CPU_GOALS = {
    "step_over_floor": ("[CPU bound] one stream's frame step <= 1.5x the bandwidth floor", 1.5,
                        "max"),
    "frame_step_ms": ("[CPU bound] one stream's frame step <= 80 ms (faster than the audio)",
                      80.0, "max"),
    "first_audio_ms": ("[CPU bound] first audio <= 1500 ms (one stream)", 1500.0, "max"),
    "realtime_streams": ("[CPU bound] >= 1 stream faster than real time", 1, "min"),
    "int8_vs_bf16": ("[CPU bound] int8 faster than bf16 per frame", 1.0, "min"),
    "int8_top1": ("int8's next codes agree with bf16's >= 90% (top-1; KL beside it)", 0.9, "min"),
}
# random:tiny on a CPU checks that the whole run works; these goals say nothing there
TINY_ON_CPU = {
    "step_over_floor": "random:tiny's step is bound by per-call overheads, not by the bytes of "
                       "its weights (frame_step_ms judges it)",
    "int8_vs_bf16": "random:tiny's layers are too small for int8 to pay (bench_quantize on "
                    "random:csm-1b measures it)",
    "int8_top1": "random:tiny's int8 agreement says nothing of csm-1b's (bench_quantize on "
                 "random:csm-1b measures it)",
}
VERDICTS = ("met", "NOT MET", "not measured", "not applicable")
FAILING = ("NOT MET", "not measured")  # the run exits non-zero on these


def step_acceptance(r: Runner, out: Path, model: str, device: str, quick: bool,
                    real_model: str | None = None) -> Path | None:
    """After --benchmark: the GPU test subset, bench_quantize, a server load test over HTTP,
    with real weights (`real_model`) the quality check, then a table of each goal against what
    was measured (JSON, PNG, report.md)."""
    r.say(f"== acceptance: {model} on {device}")
    py = str(VENV_PY)
    tests = r.run([py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/"],
                  check=False)
    r.run([py, "benchmarks/bench_quantize.py", "--model", model, "--device", device, "--modes",
           "bf16,int8", "--frames", "2" if quick else "3", "--quality-frames",
           "4" if quick else "50", "--out-dir", str(out)])
    r.run([py, "benchmarks/bench_server.py", "--model", model, "--device", device, "--clients",
           "1,4" if quick else "1,8,32,64,128", "--frames", "4" if quick else "12",
           "--repeats", "1" if quick else "3", "--out-dir", str(out)])
    if real_model is not None:  # word error rate (Whisper) and clips that never end
        r.run([py, "benchmarks/bench_quality.py", "--model", real_model, "--device", device,
               "--out-dir", str(out)], check=False)
    if r.dry_run:
        return None
    rows = acceptance_rows(out, tests.stdout, device, model)
    path = out / "acceptance.json"
    path.write_text(json.dumps({"device": _device(out), "model": model, "quick": quick,
                                "date": time.strftime("%Y-%m-%d %H:%M:%S"), "goals": rows},
                               indent=2))
    plot_acceptance(rows, out / "acceptance.png", _device(out))
    report = out / "report.md"
    lines = ["## Acceptance", "",
             *_table(["goal", "measured", "met"],
                     [[g["goal"], _measured(g), g["verdict"]] for g in rows]),
             "![acceptance](acceptance.png)", ""]
    report.write_text(report.read_text() + "\n".join(lines) + "\n")
    for g in rows:
        r.say(f"  {g['goal']}: {_measured(g)}: {g['verdict']}")
    r.say(f"acceptance: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def _measured(goal: dict) -> str:
    if goal.get("summary"):
        return goal["summary"]
    return "-" if goal["measured"] is None else f"{goal['measured']:.3g}"


def acceptance_rows(out: Path, gpu_tests_output: str, device: str = "cuda",
                    model: str = "random:csm-1b") -> list[dict]:
    """Each goal with what the benchmarks in `out` measured and its verdict (VERDICTS): met or
    NOT MET against the bound for this device, "not measured" where it should have been and
    was not (a failure), "not applicable" where it cannot apply here (listed, not a failure)."""
    goals = CPU_GOALS if device == "cpu" else GOALS
    measured = measured_figures(out)
    rows = []
    tiny = TINY_ON_CPU if device == "cpu" and model == "random:tiny" else {}
    for key, (goal, bound, kind) in goals.items():
        m = measured[key]
        met = None if m is None else (m <= bound if kind == "max" else m >= bound)
        row = {"key": key, "goal": goal, "bound": bound, "measured": m, "met": met}
        if key == "int8_top1" and m is not None:
            row["summary"] = f"{m:.3f} (KL {measured['int8_kl']:.2e})"
        rows.append(verdict(row, not_applicable=tiny.get(key)))
    rows += quality_rows(out)
    rows.append(gpu_tests_row(gpu_tests_output, device))
    return rows


def verdict(row: dict, not_applicable: str | None = None) -> dict:
    """The row's verdict from its `met` (None: not measured) or the reason it cannot apply."""
    if not_applicable:
        return {**row, "verdict": "not applicable", "summary": f"not applicable: {not_applicable}"}
    return {**row, "verdict": {True: "met", False: "NOT MET", None: "not measured"}[row["met"]]}


def measured_figures(out: Path) -> dict:
    frame, streaming = _load(out, "frame_") or {}, _load(out, "streaming_") or {}
    quant = _load(out, "quantize_") or {}
    measured = dict.fromkeys(GOALS)
    if frame.get("rows"):
        measured["step_over_floor"] = min(r["ours_over_floor"] for r in frame["rows"])
        measured["frame_step_ms"] = min(r["ours_ms"] for r in frame["rows"])
    runs = [r for r in streaming.get("rows", []) if r.get("kind") == "streams"]
    one = [r for r in runs if r["streams"] == 1]
    if one:
        measured["first_audio_ms"] = one[0]["ttfa_ms"]
    if runs:
        measured["realtime_streams"] = max([r["streams"] for r in runs
                                            if r["rtf_per_stream"] < 1] or [0])
    by_dtype = {r["dtype"]: r for r in quant.get("rows", [])}
    if "int8" in by_dtype and "bf16" in by_dtype:
        measured["int8_vs_bf16"] = by_dtype["bf16"]["ours_ms"] / by_dtype["int8"]["ours_ms"]
        measured["int8_top1"] = by_dtype["int8"].get("top1_mean")
        measured["int8_kl"] = by_dtype["int8"].get("kl_mean")
    return measured


def quality_rows(out: Path) -> list[dict]:
    """Word error rate and clips that never end: bounded on real weights; with random ones
    (no quality step ran) not applicable; a quality step that ran and failed is not measured."""
    quality = _load(out, "quality_")
    rows = []
    for key, goal, name, bound in (
            ("wer", "word error rate (Whisper, fixed sentences) <= 6%", "mean_wer", 0.06),
            ("at_cap", "share of clips that never end = 0", "share_at_cap", 0.0)):
        row = {"key": key, "goal": goal, "bound": bound, "measured": None, "met": None}
        if quality is None:
            rows.append(verdict(row, not_applicable="random weights: nothing to understand"))
            continue
        m = quality.get(name)
        why = quality.get("skipped") or (quality.get("recogniser_unavailable")
                                         if key == "wer" else None)
        row = {**row, "measured": m, "met": None if m is None else m <= bound}
        rows.append({**verdict(row), **({"summary": f"not measured: {why}"} if why else {})})
    return rows


def gpu_tests_row(output: str, device: str) -> dict:
    """The equality tests on the device (pytest -m gpu): passed, failed, or not run."""
    ran = [line for line in output.splitlines() if " passed" in line
           or " skipped" in line or " failed" in line or "no tests ran" in line]
    summary = ran[-1].strip("= ") if ran else "no summary"
    failed = " failed" in summary or " error" in summary
    row = {"key": "gpu_tests", "goal": "the equality tests on this device (pytest -m gpu)",
           "bound": None, "measured": None, "summary": summary,
           "met": False if failed else (True if " passed" in summary else None)}
    if device == "cpu" and not failed:
        return {**verdict(row, not_applicable="no GPU here"), "summary": summary}
    return verdict(row)


def failing_goals(rows: list[dict]) -> list[str]:
    """The goals that make the run fail, each with its verdict and what was measured."""
    return [f"{g['goal']}: {g['verdict']} ({_measured(g)})" for g in rows
            if g["verdict"] in FAILING]


def plot_acceptance(rows: list[dict], path: Path, device: str):
    """Measured over goal, per goal (1 is the goal; which side is good is in the label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [g for g in rows if g["measured"] is not None and g["bound"]]
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.6 * max(1, len(shown))))
    ratios = [g["measured"] / g["bound"] for g in shown]
    ax.barh([g["goal"] for g in shown], ratios,
            color=["tab:green" if g["met"] else "tab:red" for g in shown])
    ax.axvline(1.0, c="k", ls=":")
    ax.set(xscale="log", xlabel="measured / goal (log)", title=f"Acceptance on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _load(out: Path, prefix: str) -> dict | None:
    files = sorted(out.glob(f"{prefix}*.json"))
    return json.loads(files[0].read_text()) if files else None


def _device(out: Path) -> str:
    for f in sorted(out.glob("*.json")):
        return json.loads(f.read_text()).get("device", "unknown device")
    return "unknown device"


# ---------------------------------------------------------------------------------------------
# --serve
# ---------------------------------------------------------------------------------------------


def fitted_streams(info: dict) -> int:
    """Stream slots for the GPU's free memory (at least 1, at most 64); 2 on a CPU."""
    if not info["gpus"]:
        return 2
    free = max(g["memory_free_gb"] for g in info["gpus"])
    return max(1, min(64, int((free - MIN_GPU_GB) / STREAM_GB) + 1))


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


# ---------------------------------------------------------------------------------------------


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


if __name__ == "__main__":
    sys.exit(main())
