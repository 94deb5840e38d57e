"""Streaming at full CSM-1B size (random weights): first audio, RTF and frames/s.

    .venv/bin/python benchmarks/bench_streaming.py [--device auto] [--frames 12]
        [--streams 1,4,8,16]

Sweeps chunk size, frame batch size (frames per Mimi call), compile on/off (--compile), the
number of streams advanced together per step, and one stream alone in an engine of the widest
batch (what idle slots cost it), beside Generator.generate's plain loop measured in
the same run; and the frame step alone per stream count, the counts taking turns step by step
(--steps-only: just those). Random weights never say "end", so every stream runs exactly
--frames frames.
Prints a table, saves benchmarks/results/streaming_<device>.json and a PNG plot beside it.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from common import (
    add_model_argument,
    bandwidth_fields,
    bandwidth_line,
    device_name,
    frame_floor,
    memory_bandwidth,
    ms_in_turns,
    plural,
    print_table,
    save_json,
    spread,
    summarise,
    sync,
)
from csm_streaming.options import HelpFormatter

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs away."
FIGURES = ("ttfa_ms", "rtf_per_stream", "aggregate_frames_per_s", "aggregate_audio_s_per_s")


def run_streams(sg, n_streams: int, frames: int) -> dict:
    from csm_streaming.request import GenerationRequest

    reqs = [GenerationRequest.of(TEXT, i % 2, max_audio_length_ms=frames * 80, seed=i)
            for i in range(n_streams)]
    sync(sg.device)
    t0 = time.perf_counter()
    first = {}
    samples = {i: 0 for i in range(n_streams)}
    for i, chunk in sg.generate_streaming_batch(reqs):
        first.setdefault(i, time.perf_counter() - t0)
        samples[i] += chunk.numel()
    sync(sg.device)
    wall = time.perf_counter() - t0
    audio_s = sum(samples.values()) / 24_000
    return {
        "streams": n_streams,
        "ttfa_ms": max(first.values()) * 1e3,
        "rtf_per_stream": wall / (audio_s / n_streams),
        "aggregate_frames_per_s": audio_s / 0.08 / wall,
        "aggregate_audio_s_per_s": audio_s / wall,
        "wall_s": wall,
    }


def build(gen, **cfg):
    from csm_streaming.engine.config import StreamingConfig
    from csm_streaming.engine.frontend import StreamingGenerator

    return StreamingGenerator(gen, StreamingConfig(**cfg))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    add_model_argument(p)
    p.add_argument(
        "--dtype", default=None, help="bf16 or fp32 (None: bf16 on cuda, fp32 elsewhere)"
    )
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="quantized weights (quantize.py), as the server's --quantize")
    p.add_argument("--frames", type=int, default=12, help="frames per stream in each run")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each streams row (their median is the figure; min and max kept)")
    p.add_argument("--streams", default="1,4,8,16", help="streams per step to sweep")
    p.add_argument(
        "--chunks", default="160,320,640", help="chunk sizes (ms) for the 1-stream sweep"
    )
    p.add_argument("--frame-batches", default="1,2,4", help="frames per Mimi call for the sweep")
    p.add_argument(
        "--compile", action="store_true", help="add compiled runs (minutes to build on CPU)"
    )
    p.add_argument("--max-seq-len", type=int, default=512,
                   help="backbone window of the benchmark (the server's: 2048)")
    p.add_argument("--steps-only", action="store_true",
                   help="only the frame step per stream count (no plain loop, no engine sweep)")
    p.add_argument("--int8-kernels", default=None,
                   help="with --steps-only: int8 models, one per kernel named (e.g. "
                        "fbgemm,onednn: CSM_INT8_KERNEL), whose steps all take turns")
    p.add_argument(
        "--out-dir", default=None, help="where JSON and PNG go (default benchmarks/results)"
    )
    return p


def plain_row(gen, device, frames: int) -> dict:
    """Generator.generate's plain loop, same text and length, in the same process."""
    sync(device)
    t = time.perf_counter()
    gen.generate(TEXT, 0, max_audio_length_ms=frames * 80, seed=0)
    sync(device)
    wall = time.perf_counter() - t
    return {"name": "Generator.generate (plain loop)", "streams": 1, "chunk_ms": None,
            "frame_batch": None, "compiled": False, "ttfa_ms": wall * 1e3,
            "rtf_per_stream": wall / (frames * 0.08), "aggregate_frames_per_s": frames / wall}


def engine_rows(gen, args, plain: dict) -> list[dict]:
    """First audio, RTF and frames/s over chunk sizes, Mimi batch, compile and streams."""
    rows = []
    base = dict(max_seq_len=args.max_seq_len, enable_compilation=False)

    def record(name, sg, n, **info):
        runs = [run_streams(sg, n, args.frames) for _ in range(args.repeats)]
        r = {**runs[0], **summarise(runs, FIGURES)}  # the medians, each with its spread
        r.update(name=name, **info)
        r["speedup_vs_plain"] = r["aggregate_frames_per_s"] / plain["aggregate_frames_per_s"]
        rows.append(r)
        print(f"  {name}: ttfa {r['ttfa_ms']:.0f} ms, rtf {r['rtf_per_stream']:.3f}, "
              f"{r['aggregate_frames_per_s']:.2f} frames/s")

    for chunk in map(int, args.chunks.split(",")):
        sg = build(gen, chunk_size_ms=chunk, first_chunk_ms=80 * 2, frame_batch_size=2, **base)
        run_streams(sg, 1, 2)  # warm-up
        record(f"chunk {chunk} ms", sg, 1, chunk_ms=chunk, frame_batch=2, compiled=False)
    for fb in map(int, args.frame_batches.split(",")):
        sg = build(gen, chunk_size_ms=320, first_chunk_ms=80 * fb if fb <= 2 else 320,
                   frame_batch_size=fb, **base)
        record(f"frame batch {fb}", sg, 1, chunk_ms=320, frame_batch=fb, compiled=False)
    if args.compile:
        sg = build(gen, chunk_size_ms=320, max_seq_len=args.max_seq_len, enable_compilation=True)
        t = time.perf_counter()
        run_streams(sg, 1, 3)  # compiles (and captures a CUDA graph on cuda)
        warm_s = time.perf_counter() - t
        record("compiled", sg, 1, chunk_ms=320, frame_batch=None, compiled=True, warmup_s=warm_s)
    for n in map(int, args.streams.split(",")):
        sg = build(gen, chunk_size_ms=320, max_batch_size=n, **base)
        sg.warmup(frames=2, all_buckets=True)  # every bucket up to n, each timed
        run_streams(sg, n, 2)  # and the whole path at this batch size
        record(plural(n, "stream"), sg, n, kind="streams", chunk_ms=320, compiled=False,
               warmup_buckets={str(k): v for k, v in sg.warmup_buckets.items()})
        del sg
        gc.collect()
    widest = max(map(int, args.streams.split(",")))
    if widest > 1:  # what idle slots cost a lone stream (Mimi decodes the rows that speak)
        sg = build(gen, chunk_size_ms=320, max_batch_size=widest, **base)
        run_streams(sg, 1, 2)
        record(f"1 stream, {widest} slots", sg, 1, kind="wide", slots=widest, chunk_ms=320,
               compiled=False)
        del sg
        gc.collect()
    one = next(r for r in rows if r.get("kind") == "streams" and r["streams"] == 1)
    for r in rows:
        if r.get("kind") in ("streams", "wide"):
            r["aggregate_vs_1_stream"] = r["aggregate_frames_per_s"] / one["aggregate_frames_per_s"]
    return rows


def step_rows(gens: dict, args, device) -> list[dict]:
    """The frame step alone (no prefill, no Mimi): what "n streams per step" costs the model.

    One engine per stream count (compiled with --compile), each with the widest count's slots
    (a server's engine: the matrix kernels packed for that batch, shared by all) and n of them
    running. The engines take turns step by step, so the ratios between stream counts come
    from the same minutes of a noisy machine (best against best, and median against median).
    gens: one Generator, or one per int8 kernel (--int8-kernels), its name the key: all the
    engines of all of them take turns."""
    from csm_streaming.request import GenerationRequest

    counts = list(map(int, args.streams.split(",")))
    steps = {}
    for kernel, gen in gens.items():
        for n in counts:
            sg = build(gen, chunk_size_ms=320, max_batch_size=max(counts),
                       max_seq_len=args.max_seq_len, enable_compilation=args.compile)
            for i in range(n):
                sg.engine.submit(
                    GenerationRequest.of(TEXT, i % 2, max_audio_length_ms=args.max_seq_len * 40,
                                         seed=i)
                )
            sg.engine.prepare_all()
            steps[kernel, n] = (sg, sg.engine.step_fn(n))
            steps[kernel, n][1]()  # warm-up
    times = ms_in_turns({key: step for key, (_, step) in steps.items()}, device,
                          max(3, args.repeats))
    rows = []
    for kernel in gens:
        for n in counts:
            key = kernel, n
            best, median = min(times[key]), spread(times[key])["median"]
            rows.append({"name": f"frame step, {plural(n, 'stream')}"
                                 + (f" ({kernel})" if kernel else ""),
                         "streams": n, "int8_kernel": kernel or None,
                         "step_ms": best, "step_median_ms": median,
                         "aggregate_frames_per_s": n / best * 1e3,
                         "median_frames_per_s": n / median * 1e3,
                         "timing": "in turns, step by step", "slots": max(counts),
                         "compiled": steps[key][0].engine.compiled is not None,
                         "spread": {"step_ms": spread(times[key])}})
    del steps
    gc.collect()
    for r in rows:
        one = next(o for o in rows if o["int8_kernel"] == r["int8_kernel"])
        r["aggregate_vs_1_stream"] = r["aggregate_frames_per_s"] / one["aggregate_frames_per_s"]
        r["median_vs_1_stream"] = r["median_frames_per_s"] / one["median_frames_per_s"]
    return rows


def load_per_kernel(args, device) -> dict:
    """--int8-kernels: one int8 model per kernel (CSM_INT8_KERNEL at its load), a Generator
    each, their names the keys."""
    import os

    from csm_streaming.engine.reference import Generator
    from csm_streaming.model.checkpoints import load_mimi, load_model_and_tokenizer

    gens = {}
    for kernel in args.int8_kernels.split(","):
        os.environ["CSM_INT8_KERNEL"] = kernel
        model, tok, _ = load_model_and_tokenizer(args.model, device, quantize="int8")
        gens[kernel] = Generator(model, tok, load_mimi("random", device))
    del os.environ["CSM_INT8_KERNEL"]
    return gens


def main(argv=None):
    args = build_parser().parse_args(argv)
    from csm_streaming.engine.loader import pick_device
    from csm_streaming.engine.reference import Generator
    from csm_streaming.model.checkpoints import load_mimi, load_model_and_tokenizer

    torch.set_grad_enabled(False)
    device = pick_device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    probe = memory_bandwidth(device)
    if args.int8_kernels:
        if not args.steps_only:
            raise SystemExit("--int8-kernels compares frame steps: add --steps-only")
        gens = load_per_kernel(args, device)
        model = next(iter(gens.values())).model
    else:
        model, tok, _ = load_model_and_tokenizer(args.model, device, dtype)
        if args.quantize:
            from csm_streaming.model.quantize import quantize_model

            quantize_model(model, args.quantize)
        gens = {"": Generator(model, tok, load_mimi("random", device))}
    floor_ms = frame_floor(model, probe)["floor_ms"]
    print(f"device: {device_name(device)}; floor {floor_ms:.1f} ms/frame; {bandwidth_line(probe)}")
    rows = []
    if not args.steps_only:
        plain = plain_row(gens[""], device, args.frames)
        rows = [plain] + engine_rows(gens[""], args, plain)
    steps = step_rows(gens, args, device)
    print_table(
        steps, ["name", "streams", "step_ms", "step_median_ms", "aggregate_frames_per_s",
                "aggregate_vs_1_stream", "median_vs_1_stream"]
    )
    if rows:
        print_table(rows, ["name", "streams", "ttfa_ms", "rtf_per_stream", "aggregate_frames_per_s",
                           "speedup_vs_plain", "aggregate_vs_1_stream"])
    rows += steps
    path = save_json("streaming", device, {"model": args.model,
                                           "dtype": str(next(model.parameters()).dtype),
                                           "quantize": "int8" if args.int8_kernels
                                           else args.quantize,
                                           "frames": args.frames, "floor_ms_per_frame": floor_ms,
                                           **bandwidth_fields(probe),
                                           "max_seq_len": args.max_seq_len,
                                           "rows": rows}, args.out_dir)
    if not args.steps_only:
        plot(rows, floor_ms, device, path.with_suffix(".png"))


def plot(rows, floor_ms, device, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    streams = [r for r in rows if r.get("kind") == "streams"]
    steps = [r for r in rows if "step_ms" in r]
    xs = [r["streams"] for r in streams]
    low = [r["spread"]["aggregate_frames_per_s"]["min"] for r in streams]
    high = [r["spread"]["aggregate_frames_per_s"]["max"] for r in streams]
    a.fill_between(xs, low, high, alpha=0.25, label="min-max over the runs")
    a.plot(xs, [r["aggregate_frames_per_s"] for r in streams], "o-", label="engine, batched")
    a.plot([r["streams"] for r in steps], [r["aggregate_frames_per_s"] for r in steps], "s--",
           label="frame step alone")
    # log scales: the references (a tiny model's floor is far above its data) never squash it
    a.axhline(1000 / floor_ms, ls="--", c="gray", label="1-stream bandwidth floor")
    a.axhline(12.5, ls=":", c="red", label="real time, 1 stream")
    a.set(xlabel="streams per step", ylabel="aggregate frames / s", title="Batched streams",
          yscale="log")
    a.legend()
    ones = [r for r in rows if r["streams"] == 1 and "step_ms" not in r]
    b.barh([r["name"] for r in ones], [r["rtf_per_stream"] for r in ones])
    b.axvline(1.0, c="red", ls=":", label="real time")
    b.set(xlabel="RTF (lower is faster)", title="One stream", xscale="log")
    b.legend()
    fig.suptitle(f"CSM-1B streaming, random weights, {device_name(device)}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"saved {path.name}")


if __name__ == "__main__":
    main()
