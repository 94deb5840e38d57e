"""Time of one frame step at full CSM-1B size (random weights) beside the bandwidth floor.

    .venv/bin/python benchmarks/bench_frame.py [--device auto] [--frames 5] [--dtypes bf16,fp32]

For each dtype: (a) the floor, the time one frame's weight reads take at the bandwidths measured
in the same run: DRAM for what is read once a frame, the last-level cache for the depth
decoder's 30 re-reads where one step's weights fit in the cache this machine lets us use
(common.frame_floor; a step that beats it is reported as a defect of the probes); (b) our
engine's frame step (static caches, no host sync); (c) the plain per-frame loop of the
reference Generator, which has the original release's structure (tokens grown with
torch.cat, one backbone call over the new positions, 31 depth-decoder calls), (b) and (c)
taking turns so that their ratio comes from the same minutes; (d) with --compile, our step
compiled (on a CPU: inductor's own matrix kernels over frozen weights), beside the eager one.
Prints a table and saves benchmarks/results/frame_<device>.json.
"""

from __future__ import annotations

import argparse
import gc

import torch

from common import (
    add_isa_argument,
    add_model_argument,
    apply_isa,
    bandwidth_fields,
    bandwidth_line,
    device_name,
    floor_check,
    frame_floor,
    memory_bandwidth,
    print_table,
    running_engine,
    save_json,
    spread,
    time_calls,
    weight_bytes_per_frame,
)
from csm_streaming.options import HelpFormatter

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def bench_dtype(name: str, device: torch.device, frames: int, model_name: str, probe: dict,
                compile_: bool) -> list[dict]:
    """The eager step's row and, with compile_, the compiled step's beside it (same weights,
    same run; its speed as a ratio to the eager one)."""
    from csm_streaming.model.checkpoints import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(model_name, device, DTYPES[name])
    rows = [bench_model(name, model, tok, device, frames, probe, False)]
    if compile_:
        row = bench_model(name, model, tok, device, frames, probe, True, plain_loop=False)
        row["plain_ms"] = rows[0]["plain_ms"]
        row["plain_over_ours"] = row["plain_ms"] / row["ours_ms"]
        row["speed_vs_eager"] = rows[0]["ours_ms"] / row["ours_ms"]
        rows.append(row)
    return rows


def bench_model(name: str, model, tok, device: torch.device, frames: int, probe: dict,
                compile_: bool, plain_loop: bool = True) -> dict:
    """One model's frame step beside its floor and the plain loop's, the two taking turns
    (unless plain_loop=False): each round times the plain loop over 1 and over frames + 1
    frames (per frame: the difference over frames, the prefill cancels out), then `frames` of
    our steps, so a slow moment of the machine falls on both. Where our engine swaps the CPU's
    packed matrix kernels into its model (fp32 on a CPU), the plain loop runs on a copy with
    plain layers, as the original release's torchtune layers are."""
    import copy

    from csm_streaming.engine.reference import Generator
    from csm_streaming.model.checkpoints import load_mimi
    from csm_streaming.model.cpu_kernels import cpu_kernel_applies, restore_linears

    restore_linears(model)  # plain weights again if an earlier engine swapped in CPU kernels
    mimi = load_mimi("random", device)
    gen = Generator(model, tok, mimi)
    floor = frame_floor(model, probe)
    row = {"dtype": name, "weight_gb_per_frame": weight_bytes_per_frame(model) / 1e9, **floor}
    plain = None
    if plain_loop:
        shared = not (device.type == "cpu" and cpu_kernel_applies(model))
        plain_gen = gen if shared else Generator(copy.deepcopy(model), tok, mimi)

        def plain(n):
            return lambda: plain_gen.generate_codes("Benchmark sentence for timing.", 0,
                                                    max_audio_length_ms=n * 80,
                                                    stop_at_eos=False, seed=0)
        plain(1)()  # warm-up

    engine = running_engine(gen, 1, compile_)
    step = engine.step_fn(1)
    time_calls(step, device, 0, warmup=2 if compile_ else 1)
    ours, plain_ms = [], []
    rounds = 2 if plain_loop else 1
    for _ in range(rounds):
        if plain:
            one = time_calls(plain(1), device, 1, warmup=0)[0]
            many = time_calls(plain(frames + 1), device, 1, warmup=0)[0]
            plain_ms.append((many - one) / frames * 1e3)
        ours += [t * 1e3 for t in time_calls(step, device, frames, warmup=0)]
    engine.cancel(engine.active[0])
    row["cpu_kernel"] = engine.cpu_kernel
    del engine, plain
    ours_best = min(ours)
    row.update({"ours_ms": ours_best, "ours_median_ms": spread(ours)["median"],
                "ours_spread_ms": spread(ours), "ours_over_floor": ours_best / floor["floor_ms"],
                "ours_rtf": ours_best / 80, "compiled": compile_})
    if plain_ms:
        row.update({"plain_ms": min(plain_ms), "plain_runs_ms": plain_ms,
                    "plain_over_ours": min(plain_ms) / ours_best,
                    "timing": "in turns: plain loop, then our steps, twice"})
    gc.collect()
    return floor_check(row)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--frames", type=int, default=5, help="frame steps timed (the best is kept)")
    p.add_argument("--dtypes", default="bf16,fp32", help="weight types to compare")
    add_model_argument(p)
    add_isa_argument(p)
    p.add_argument("--compile", action="store_true",
                   help="also time our step compiled, beside the eager one (minutes to build "
                        "on a CPU)")
    p.add_argument(
        "--out-dir", default=None, help="where the JSON goes (default benchmarks/results)"
    )
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    apply_isa(args.isa)
    from csm_streaming.engine.loader import pick_device

    device = pick_device(args.device)
    torch.set_grad_enabled(False)
    probe = memory_bandwidth(device)
    print(f"device: {device_name(device)}; {bandwidth_line(probe)}")
    rows = [row for d in args.dtypes.split(",")
            for row in bench_dtype(d, device, args.frames, args.model, probe, args.compile)]
    print_table(rows, ["dtype", "compiled", "weight_gb_per_frame", "depth_step_mb",
                       "depth_step_in_cache", "floor_ms", "ours_ms",
                       "plain_ms", "ours_over_floor", "plain_over_ours", "speed_vs_eager",
                       "ours_rtf", "cpu_kernel"])
    save_json("frame", device, {"model": args.model, **bandwidth_fields(probe),
                                "frames": args.frames, "rows": rows}, args.out_dir)


if __name__ == "__main__":
    main()
