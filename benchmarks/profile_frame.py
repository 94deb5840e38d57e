"""Where one frame step's time goes, by part of the model, beside each part's bandwidth floor.

    .venv/bin/python benchmarks/profile_frame.py [--mode fp32] [--streams 1] [--frames 3]

Runs our engine's frame step (eager, static caches) under the torch profiler and splits its time
by part: the backbone step, the depth decoder's 31 steps, the projection into it, the codebook-0
head, the 31 audio heads, the sampler, and the rest (embeddings, the engine's own work). Within
each part: the matrix products (with the weight bytes they read and the speed they read them
at), attention, and the other small ops (norms, RoPE, cache writes...), as self times, so
nothing is counted twice. Each part's floor is its weight bytes over the bandwidth measured
in the same run: DRAM, and for the depth decoder and the projection the cache's for the 30
reads after the first where one step's weights fit in it (common.frame_floor). The profiler
adds its own time per op: the step timed without it is reported beside the total, and the
profiled step's time outside any op (Python between ops and the profiler's own work) as
"between ops" (its share is of the ops' total). Prints a table and saves
benchmarks/results/profile_<mode>_<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
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
    print_table,
    running_engine,
    save_json,
    time_calls,
    weight_bytes_by_part,
)
from csm_streaming.options import HelpFormatter

PARTS = ("backbone", "depth decoder", "projection", "codebook-0 head", "audio heads", "sampler")
OTHER = "rest"
PRODUCT_WORDS = ("mm", "linear", "matmul")  # aten::mm/addmm/bmm, oneDNN/MKL/FBGEMM linears
ATTENTION_WORDS = ("scaled_dot_product",)


def is_product(name: str) -> bool:
    op = name.split("::")[-1]
    return any(w in op for w in PRODUCT_WORDS)


@contextlib.contextmanager
def labelled_parts(model):
    """Each part of `model` runs inside a profiler range named after it (module hooks; the
    audio heads and the sampler are wrapped functions). Undone on exit."""
    import csm_streaming.model.csm as csm_module

    open_ranges = []

    def enter(name):
        r = torch.profiler.record_function(name)
        r.__enter__()
        open_ranges.append(r)

    def leave():
        open_ranges.pop().__exit__(None, None, None)

    def in_range(name, fn):
        def run(*args, **kwargs):
            enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                leave()
        return run

    handles = []
    for name, module in (("backbone", model.backbone), ("depth decoder", model.decoder),
                         ("projection", model.projection),
                         ("codebook-0 head", model.codebook0_head)):
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: enter(n)))
        handles.append(module.register_forward_hook(lambda m, a, o: leave()))
    sampler = csm_module.sample_topk
    model.audio_logits = in_range("audio heads", model.audio_logits)  # shadows the method
    csm_module.sample_topk = in_range("sampler", sampler)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        del model.audio_logits
        csm_module.sample_topk = sampler


def split_events(events, frames: int) -> dict[str, dict]:
    """Profiler events -> per part: self ms a frame in products, attention and other ops, and
    the product calls a frame (outermost product ops only)."""
    parts = {p: {"products_ms": 0.0, "attention_ms": 0.0, "other_ms": 0.0, "product_calls": 0}
             for p in (*PARTS, OTHER)}
    for e in events:
        if e.name in PARTS:
            continue  # a range: its time is its ops' time
        part, in_attention, in_product = OTHER, False, False
        parent = e.cpu_parent
        while parent is not None:
            if parent.name in PARTS:
                part = parent.name
                break
            in_attention |= any(w in parent.name for w in ATTENTION_WORDS)
            in_product |= is_product(parent.name)
            parent = parent.cpu_parent
        ms = e.self_cpu_time_total / 1e3 / frames
        row = parts[part]
        if in_attention or any(w in e.name for w in ATTENTION_WORDS):
            row["attention_ms"] += ms
        elif in_product or is_product(e.name):
            row["products_ms"] += ms
            row["product_calls"] += 0 if in_product else 1
        else:
            row["other_ms"] += ms
    for row in parts.values():
        row["product_calls"] /= frames
    return parts


def profile(model, tok, device: torch.device, streams: int, frames: int,
            probe: dict) -> dict:
    from csm_streaming.engine.reference import Generator
    from csm_streaming.model.checkpoints import load_mimi

    # before the engine swaps in CPU kernels (packed buffers), in PARTS' order, then the rest
    nbytes = {**weight_bytes_by_part(model), "sampler": 0, OTHER: 0}
    floors = frame_floor(model, probe)
    engine = running_engine(Generator(model, tok, load_mimi("random", device)), streams)
    step = engine.step_fn(streams)
    wall = time_calls(step, device, frames, warmup=1)
    with labelled_parts(model):
        step()  # the wrapped functions' first call outside the profile
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(frames):
                step()
            profiled_wall = (time.perf_counter() - t0) / frames
    for s in list(engine.active):
        engine.cancel(s)
    parts = split_events(prof.events(), frames)
    rows = []
    for name, p in parts.items():
        total = p["products_ms"] + p["attention_ms"] + p["other_ms"]
        gb = nbytes[name] / 1e9
        rows.append({"part": name, "ms": total, **p, "weight_gb": gb,
                     "products_gb_s": gb / (p["products_ms"] / 1e3) if gb and p["products_ms"]
                     else None,
                     "floor_ms": floors["parts_floor_ms"].get(name) if gb else None})
    profiled = sum(r["ms"] for r in rows)
    for r in rows:
        r["share"] = r["ms"] / profiled
    floor = floors["floor_ms"]
    summary = {"part": "frame step", "ms": profiled,
               **{k: sum(r[k] for r in rows)
                  for k in ("products_ms", "attention_ms", "other_ms", "product_calls",
                            "weight_gb")},
               "floor_ms": floor, "share": 1.0}
    untracked = {"part": "between ops", "ms": profiled_wall * 1e3 - profiled,
                 "share": profiled_wall * 1e3 / profiled - 1}
    return {"rows": [*rows, summary, untracked], "wall_ms": min(wall) * 1e3,
            "wall_over_floor": min(wall) * 1e3 / floor, "cpu_kernel": engine.cpu_kernel,
            "floor": floors}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--mode", default="fp32", choices=("fp32", "bf16", "int8", "int4"),
                   help="weights: fp32 / bf16, or int8 / int4 (quantize.py)")
    p.add_argument("--streams", type=int, default=1, help="streams in each frame step")
    p.add_argument("--frames", type=int, default=3, help="frame steps profiled (and timed)")
    add_model_argument(p)
    p.add_argument("--out-dir", default=None,
                   help="where the JSON goes (default benchmarks/results)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from bench_quantize import variant
    from csm_streaming.engine.loader import pick_device
    from csm_streaming.model.checkpoints import load_model_and_tokenizer

    device = pick_device(args.device)
    torch.set_grad_enabled(False)
    probe = memory_bandwidth(device)
    print(f"device: {device_name(device)}; {bandwidth_line(probe)}")
    master, tok, _ = load_model_and_tokenizer(args.model, torch.device("cpu"), torch.float32)
    model = variant(master, args.mode, device)
    del master
    gc.collect()
    result = profile(model, tok, device, args.streams, args.frames, probe)
    print_table(result["rows"], ["part", "ms", "share", "products_ms", "product_calls",
                                 "attention_ms", "other_ms", "weight_gb", "products_gb_s",
                                 "floor_ms"])
    print(f"frame step without the profiler: {result['wall_ms']:.0f} ms "
          f"({result['wall_over_floor']:.2f}x its floor; kernel {result['cpu_kernel']})")
    save_json(f"profile_{args.mode}", device,
              {"model": args.model, "mode": args.mode, "streams": args.streams,
               "frames": args.frames, **bandwidth_fields(probe), **result}, args.out_dir)


if __name__ == "__main__":
    main()
