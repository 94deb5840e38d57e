"""Shared by the benchmark scripts: device facts, a bandwidth probe, timing, table and JSON."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def slug(device: torch.device) -> str:
    """A file name part: the GPU's name, or cpu-<vendor>-<family>-<instruction sets>
    (cpu-amd-epyc-avx2, cpu-amd-epyc-avx512-vnni, ...-as-avx2 when capped: `--isa`): results on
    different CPUs do not overwrite each other."""
    if device.type != "cpu":
        return "-".join(re.findall(r"[a-z0-9]+", device_name(device).lower()))
    name = re.sub(r"\(.*?\)|CPU|Processor", " ", device_name(device))
    flags = set(cpu_flag_list())
    isa = ("avx512-vnni" if {"avx512f", "avx512_vnni"} <= flags else "avx512" if "avx512f" in flags
           else "avx2" if "avx2" in flags else "")
    cap = isa_cap()
    return "-".join(["cpu", *re.findall(r"[a-z0-9]+", name.lower())[:2],
                     *([isa] if isa else []), *([f"as-{cap}"] if cap else [])])


# Caps on this CPU's instruction sets for oneDNN, FBGEMM, ATen (and inductor's C++) and MKL,
# read when they load: `--isa avx2` measures how a CPU with AVX2 only (no AVX-512, no VNNI: the
# int8 activations go in at 7 bits, quantize.cpu_has_vnni) runs beside this machine's memory.
ISA_CAPS = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
                     "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def isa_cap() -> str | None:
    """The ISA_CAPS entry this process runs under, or None."""
    return next((name for name, env in ISA_CAPS.items()
                 if all(os.environ.get(k) == v for k, v in env.items())), None)


def add_isa_argument(parser):
    parser.add_argument("--isa", default="native", choices=("native", *ISA_CAPS),
                        help="native, or avx2: cap oneDNN, FBGEMM, ATen and MKL at AVX2 (the "
                             "script runs again with the caps set) to measure an AVX2-only CPU "
                             "with this machine's memory")


def apply_isa(isa: str):
    """Run this script again under ISA_CAPS[isa] unless it already runs so (the libraries read
    the caps when they load: too late to set them now)."""
    if isa == "native" or isa_cap() == isa:
        return
    print(f"running again with {isa} caps: {ISA_CAPS[isa]}", flush=True)
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ISA_CAPS[isa]})


def memory_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 5) -> dict:
    """Read bandwidth (bytes/s) of two probes over ~1 GiB of fp32, best of `repeats` each: a sum
    (a pure stream read) and a matrix-vector product (the access pattern of a frame step). The
    floor uses the faster one: the best this device is seen to read."""
    n = int((gib * 2**30 / 4) ** 0.5)
    w = torch.ones(n, n, device=device)
    v = torch.ones(n, device=device)

    def best(fn):
        t_best = float("inf")
        for _ in range(repeats + 1):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            t_best = min(t_best, time.perf_counter() - t)
        return w.numel() * 4 / t_best

    probes = {"sum": best(lambda: w.sum()), "gemv": best(lambda: w @ v)}
    return {"probes_gb_s": {k: b / 1e9 for k, b in probes.items()}, "best": max(probes.values())}


def weight_bytes_by_part(model) -> dict[str, int]:
    """Weight bytes each part of the model reads in one frame, as stored (int8 / int4 weights
    one or half a byte each): the backbone step, the codebook-0 head, the depth decoder's and
    the projection's 31 steps, and the audio heads. Embedding rows read are negligible."""
    from csm_streaming.model.quantize import weight_bytes

    steps = model.args.audio_num_codebooks - 1
    heads = model.audio_head.numel() * model.audio_head.element_size()  # 0 once int8
    if model.audio_heads_int8 is not None:
        heads += weight_bytes(model.audio_heads_int8)
    return {"backbone": weight_bytes(model.backbone),
            "depth decoder": steps * weight_bytes(model.decoder),
            "projection": steps * weight_bytes(model.projection),
            "codebook-0 head": weight_bytes(model.codebook0_head),
            "audio heads": heads}


def weight_bytes_per_frame(model) -> int:
    """Weight bytes one frame must read (the sum of `weight_bytes_by_part`)."""
    return sum(weight_bytes_by_part(model).values())


def running_engine(gen, streams: int, compile_: bool = False):
    """A StreamEngine of `streams` slots over `gen`, each slot a running request long enough
    for any timing (the prompt and every frame fit in the window); its step is `step_fn`."""
    from csm_streaming.engine.config import StreamingConfig
    from csm_streaming.engine.scheduler import StreamEngine
    from csm_streaming.request import GenerationRequest

    engine = StreamEngine(gen, StreamingConfig(enable_compilation=compile_,
                                               max_batch_size=streams))
    for i in range(streams):
        engine.submit(GenerationRequest.of(f"Benchmark sentence number {i}.", 0, seed=i,
                                           max_audio_length_ms=(gen.model.window - 64) * 80))
    engine.prepare_all()
    return engine


def time_calls(fn, device, n: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def ms_in_turns(fns: dict, device, rounds: int) -> dict:
    """Milliseconds of every call of each `fns[key]()`, the functions taking turns one call
    each for `rounds` rounds (no warm-up): a slow moment of the machine falls on all of them
    alike, so ratios between them come from the same minutes. (The engine's own choices use
    cpu_kernels.time_in_turns: best seconds only, with a warm-up round.)"""
    times = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            times[key] += [t * 1e3 for t in time_calls(fn, device, 1, warmup=0)]
    return times


def spread(values) -> dict:
    """min, median, max and the number of runs of a measured figure."""
    v = sorted(values)
    return {"min": v[0], "median": v[len(v) // 2], "max": v[-1], "n": len(v)}


def summarise(runs: list[dict], figures) -> dict:
    """Repeated runs -> each figure's median, with its spread under "spread"."""
    spreads = {k: spread([r[k] for r in runs]) for k in figures}
    return {**{k: v["median"] for k, v in spreads.items()}, "spread": spreads}


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def print_table(rows: list[dict], columns: list[str]):
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        if 0 < abs(v) < 0.01:
            return f"{v:.2e}"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return "-" if v is None else str(v)


def cpu_flag_list() -> list[str]:
    """The CPU's kernel-deciding instruction sets, in CPU_FLAGS' order: a CPU figure means little
    without them."""
    from csm_streaming.model.cpu_kernels import CPU_FLAGS, cpu_flags

    return [f for f in CPU_FLAGS if f in cpu_flags()]


def save_json(name: str, device: torch.device, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{slug(device)}.json"
    payload = {"device": device_name(device), "device_type": device.type,
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "threads": torch.get_num_threads(),
               **({"cpu_flags": cpu_flag_list(), "isa_cap": isa_cap()}
                  if device.type == "cpu" else {}), **payload}
    path.write_text(json.dumps(payload, indent=2))
    print(f"saved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def model_arg(value: str) -> str:
    """--model: random:csm-1b / random:tiny (random weights: speed does not depend on their
    values), a checkpoint, or a bare flavour name (csm-1b, tiny) as earlier versions took."""
    from csm_streaming.model.csm import FLAVORS

    return f"random:{value}" if value in FLAVORS else value


def add_model_argument(parser, default: str = "random:csm-1b"):
    parser.add_argument("--model", default=default, type=model_arg,
                        help="random:csm-1b or random:tiny (random weights: speed does not depend "
                             "on them), or a checkpoint (hub repo, local folder)")


def flavour(model: str) -> str:
    return model.split(":", 1)[1] if model.startswith("random:") else "csm-1b"


def env_flags() -> dict:
    return {k: os.environ[k] for k in ("NO_TORCH_COMPILE", "NO_CUDA_GRAPH") if k in os.environ}
