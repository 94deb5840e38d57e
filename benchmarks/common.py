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


def cache_levels() -> dict[str, int]:
    """The CPU's data caches as the kernel lists them (sysfs): {"L1": bytes, "L2": ..., "L3":
    ...} for one core's view (an L3 is shared by the cores listed with it)."""
    found = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = (index / "level").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind != "Instruction":
            units = {"K": 2**10, "M": 2**20, "G": 2**30}
            found[f"L{level}"] = int(size.rstrip("KMG")) * units.get(size[-1], 1)
    return found


def last_level_cache(device: torch.device) -> int:
    """Bytes of the last cache level a frame step can keep weights in: a CPU's L3 (or its last
    level), a GPU's L2; 0 where unknown."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    if device.type == "cpu":
        levels = cache_levels()
        return levels[max(levels)] if levels else 0
    return 0


def _read_rate(device: torch.device, nbytes: int, repeats: int, op: str = "gemv") -> float:
    """Bytes/s of reading an fp32 matrix of ~nbytes, best of `repeats`: a matrix-vector product
    ("gemv": a frame step's access pattern) or a sum (a pure stream read). Small matrices are
    read several times per timing (each read from wherever it stays)."""
    n = max(64, int((nbytes / 4) ** 0.5))
    w, v = torch.ones(n, n, device=device), torch.ones(n, device=device)
    fn = (lambda: w @ v) if op == "gemv" else (lambda: w.sum())
    reads = max(1, (256 << 20) // (n * n * 4))  # ~256 MB a timing: long enough to time
    t_best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        for _ in range(reads):
            fn()
        sync(device)
        t_best = min(t_best, time.perf_counter() - t)
    return w.numel() * 4 * reads / t_best


def memory_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 5) -> dict:
    """Read bandwidth, DRAM and cache apart, best of `repeats` each (bytes/s).

    DRAM: a sum (a pure stream read) and a matrix-vector product (a frame step's access
    pattern) over ~1 GiB, at least 8x the last-level cache: "dram", the faster.
    Cache: the product over matrices of 1/8 .. 2x the last-level cache, read again and again:
    the rate at 1/4 of it is "cache" (well inside it), and "usable_cache_bytes" the largest
    size still read at >= 1.5x the product's DRAM rate: what a step can keep in cache on this
    machine (a virtual machine's share of a shared L3 may be smaller than the L3)."""
    llc = last_level_cache(device)
    big = max(int(gib * 2**30), 8 * llc)
    probes = {op: _read_rate(device, big, repeats, op) for op in ("sum", "gemv")}
    dram = max(probes.values())
    curve = {size: _read_rate(device, size, repeats) for size in
             ([llc // 8, llc // 4, llc // 2, llc, 2 * llc] if llc else [])}
    usable = max((size for size, rate in curve.items() if rate >= 1.5 * probes["gemv"]),
                 default=0)
    return {"probes_gb_s": {k: b / 1e9 for k, b in probes.items()}, "dram": dram,
            "cache": curve.get(llc // 4, dram), "llc_bytes": llc, "usable_cache_bytes": usable,
            "cache_curve_gb_s": {f"{size / 2**20:g} MiB": rate / 1e9
                                 for size, rate in curve.items()}}


def frame_floor(model, probe: dict) -> dict:
    """The least time one frame's weight reads can take on this machine (one stream), in all
    and per part: the backbone, the codebook-0 head and the 31 audio heads are read once a
    frame, from DRAM (the backbone, streaming through the cache, evicts it); the depth decoder
    and the projection are read 31 times: from DRAM once, then from cache 30 times where one
    step's weights fit in the cache measured usable (`memory_bandwidth`), else from DRAM every
    time."""
    parts = weight_bytes_by_part(model)
    steps = model.args.audio_num_codebooks - 1
    per_step = (parts["depth decoder"] + parts["projection"]) / steps
    fits = 0 < per_step <= probe["usable_cache_bytes"]
    dram, cache = probe["dram"], probe["cache"]

    def seconds(part: str) -> float:
        if fits and part in ("depth decoder", "projection"):
            return parts[part] / steps / dram + parts[part] * (steps - 1) / steps / cache
        return parts[part] / dram

    per_part = {part: seconds(part) * 1e3 for part in parts}
    cache_bytes = (steps - 1) * per_step if fits else 0
    return {"floor_ms": sum(per_part.values()), "parts_floor_ms": per_part,
            "dram_gb_per_frame": (sum(parts.values()) - cache_bytes) / 1e9,
            "cache_gb_per_frame": cache_bytes / 1e9, "depth_step_mb": per_step / 1e6,
            "depth_step_in_cache": fits}


def bandwidth_line(probe: dict) -> str:
    """The probe in one line: DRAM, the cache well inside it, how much of the cache is usable."""
    llc = probe.get("llc_bytes", 0)
    cache = (f"; cache {probe['cache'] / 1e9:.1f} GB/s (last level {llc / 2**20:g} MiB, "
             f"{probe['usable_cache_bytes'] / 2**20:g} MiB read >= 1.5x DRAM)" if llc else "")
    return (f"DRAM read {probe['dram'] / 1e9:.1f} GB/s (probes: "
            f"{', '.join(f'{k} {v:.1f}' for k, v in probe['probes_gb_s'].items())}){cache}")


def bandwidth_fields(probe: dict) -> dict:
    """The probe as a result file keeps it."""
    return {"bandwidth_gb_s": probe["dram"] / 1e9, "bandwidth_probes_gb_s": probe["probes_gb_s"],
            "cache_gb_s": probe["cache"] / 1e9, "llc_bytes": probe["llc_bytes"],
            "usable_cache_bytes": probe["usable_cache_bytes"],
            "cache_curve_gb_s": probe["cache_curve_gb_s"]}


def floor_check(row: dict) -> dict:
    """The row's step against its floor: a step faster than the floor means the probes read
    less than the step does, so the floor is wrong here: reported as a defect, not a result."""
    if row["ours_ms"] < row["floor_ms"]:
        row["floor_defect"] = (f"the step ({row['ours_ms']:.1f} ms) beat its floor "
                               f"({row['floor_ms']:.1f} ms): the bandwidth probes read slower "
                               "than the step does, so this floor is wrong on this machine")
        print(f"DEFECT ({row['dtype']}): {row['floor_defect']}")
    return row


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
