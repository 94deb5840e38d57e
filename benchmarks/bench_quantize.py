"""Weight-only int8 / int4 at full CSM-1B size (random weights): speed and logit quality.

    .venv/bin/python benchmarks/bench_quantize.py [--device auto] [--modes fp32,bf16,int8,int4]
        [--quality-frames 50] [--frames 5]
    .venv/bin/python benchmarks/bench_quantize.py --modes fp32,int8,int8+compile --frames 9
    .venv/bin/python benchmarks/bench_quantize.py --modes fp32,int8+compile --isa avx2

One fp32 model with random weights; every variant is made from it, so all share the same
weights. For each: (a) the frame step of our engine beside the floor of its own weight bytes
(bandwidth measured in the same run), the variants taking turns frame by frame so that their
ratios (speed_vs_fp32: best against best, median_speed_vs_fp32: median against median) come
from the same minutes of a noisy machine; (b) quality against bf16: the same 50 frames are fed to
every variant (teacher forcing: codes sampled once from the bf16 model, top-k 50), and for each
of the 32 codebooks the KL divergence KL(bf16 || variant) of the next-code distribution and the
share of positions where the top-1 code agrees. Random weights give nearly flat distributions,
where top-1 flips on tiny differences: read the fp32 row as the noise floor of the measure.
Quality on the real weights is not measured here (none can be downloaded). Prints a table and
saves benchmarks/results/quantize_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import gc

import torch

from common import (
    add_isa_argument,
    add_model_argument,
    apply_isa,
    bandwidth_fields,
    bandwidth_line,
    device_name,
    memory_bandwidth,
    print_table,
    save_json,
)
from csm_streaming.options import HelpFormatter

TEXT = "Benchmark sentence for the quality of quantized weights."
COMPILED = "+compile"  # a mode's suffix: its engine compiled (CUDA; int8 with oneDNN on a CPU)


def variant(master, mode: str, device: torch.device):
    """The fp32 master as `mode`: fp32 / bf16 copies, or int8 / int4 weights (quantize.py) with
    the device's usual activations (fp32 on a CPU, bf16 on a GPU). A "+compile" suffix is the
    same variant (its engine is compiled when timed)."""
    from csm_streaming.model.quantize import quantize_model

    mode = mode.removesuffix(COMPILED)
    if mode in ("fp32", "bf16"):
        dtype = torch.float32 if mode == "fp32" else torch.bfloat16
        return copy.deepcopy(master).to(device=device, dtype=dtype)
    activations = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = copy.deepcopy(master).to(device=device, dtype=activations)
    quantize_model(model, mode)
    return model


@torch.inference_mode()
def frame_logits(model, tok, frames: int, codes: torch.Tensor | None = None, seed: int = 0):
    """Logits [frames, 32, vocab] (float32) of every codebook, each given the codes before it.
    codes None: sample them (top-k 50, temperature 0.9) as it goes; returns (logits, codes)."""
    from csm_streaming.engine.prompt_rows import text_rows

    device = next(model.parameters()).device
    tokens, mask = text_rows(tok, TEXT, 0)
    caches = model.make_caches(1, tokens.shape[0] + frames + 1)
    h = model.prefill(tokens[None].to(device), mask[None].to(device), caches, 0)
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(frames, 32, model.args.audio_vocab_size)
    chosen = torch.empty(frames, 32, dtype=torch.long) if codes is None else codes

    def pick(f, i, logits):
        out[f, i] = logits.float().cpu()[0]
        if codes is None:
            top = torch.topk(out[f, i] / 0.9, 50)
            chosen[f, i] = top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=g)]
        return chosen[f, i].view(1).to(device)

    for f in range(frames):
        c = pick(f, 0, model.codebook0_head(h))
        x = torch.stack([h, model.embed_audio(0, c)], dim=1)
        pos = torch.arange(2, device=device)[None]
        for i in range(1, 32):
            d = model.decoder(model.projection(x), pos, caches.decoder, 0).to(h.dtype)[:, -1]
            c = pick(f, i, model.audio_logits(d, i))
            x, pos = model.embed_audio(i, c)[:, None], pos[:, -1:] + 1
        h = model.backbone_step(chosen[f:f + 1].to(device),
                                torch.tensor([tokens.shape[0] + f], device=device), caches)
    return out, chosen


def compare(ref: torch.Tensor, other: torch.Tensor) -> dict:
    """Per codebook: mean KL(ref || other) in nats and the top-1 agreement, over the frames."""
    logp, logq = ref.log_softmax(-1), other.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean(0)  # [32]
    agree = (ref.argmax(-1) == other.argmax(-1)).float().mean(0)  # [32]
    return {"kl_mean": kl.mean().item(), "kl_codebook0": kl[0].item(),
            "kl_max_codebook": kl.max().item(), "top1_mean": agree.mean().item(),
            "top1_codebook0": agree[0].item(), "top1_min_codebook": agree.min().item(),
            "kl_per_codebook": kl.tolist(), "top1_per_codebook": agree.tolist()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--modes", default="fp32,bf16,int8,int4",
                   help="variants (int4 runs on the CPU only); with +compile (int8+compile) "
                        "the variant's engine is compiled, its quality the eager one's "
                        "(the compiled products are the same, tests/test_quantize.py)")
    p.add_argument("--frames", type=int, default=5,
                   help="frame steps timed per variant, the variants taking turns (best and "
                        "median kept)")
    p.add_argument("--quality-frames", type=int, default=50, help="frames compared for quality")
    add_model_argument(p)
    add_isa_argument(p)
    p.add_argument("--out-dir", default=None,
                   help="where the JSON goes (default benchmarks/results)")
    return p


def timed_in_turns(models: dict, tok, device: torch.device, frames: int, probe: dict
                   ) -> dict[str, dict]:
    """Each model's frame step (one stream, our engine) beside the floor of its own weight
    bytes. The models take turns frame by frame, so a slow moment of the machine falls on all
    of them alike: their ratios are read from the same minutes."""
    from common import (
        floor_check,
        frame_floor,
        ms_in_turns,
        running_engine,
        spread,
        weight_bytes_per_frame,
    )
    from csm_streaming.engine.reference import Generator
    from csm_streaming.model.checkpoints import load_mimi

    steps = {}
    # bytes of the plain layers, before an engine swaps in the CPU's packed ones
    frame_bytes = {mode: weight_bytes_per_frame(model) for mode, model in models.items()}
    floors = {mode: frame_floor(model, probe) for mode, model in models.items()}
    for mode, model in models.items():
        engine = running_engine(Generator(model, tok, load_mimi("random", device)), 1,
                                compile_=mode.endswith(COMPILED))
        steps[mode] = (engine, engine.step_fn(1))
        steps[mode][1]()  # warm-up
    times = ms_in_turns({mode: step for mode, (_, step) in steps.items()}, device, frames)
    rows = {}
    for mode, (engine, _) in steps.items():
        floor = floors[mode]["floor_ms"]
        best = min(times[mode])
        rows[mode] = {"dtype": mode, "compiled": engine.compiled is not None,
                      "weight_gb_per_frame": frame_bytes[mode] / 1e9, **floors[mode],
                      "cpu_kernel": engine.cpu_kernel, "ours_ms": best,
                      "ours_median_ms": spread(times[mode])["median"],
                      "ours_spread_ms": spread(times[mode]), "ours_over_floor": best / floor,
                      "ours_rtf": best / 80}
        floor_check(rows[mode])
        engine.cancel(engine.active[0])
    return rows


def main(argv=None):
    args = build_parser().parse_args(argv)
    apply_isa(args.isa)
    from csm_streaming.engine.loader import pick_device
    from csm_streaming.model.checkpoints import load_model_and_tokenizer
    from csm_streaming.model.quantize import Int8Linear, check_mode

    device = pick_device(args.device)
    modes = [m for m in args.modes.split(",")
             if m in ("fp32", "bf16") or not check_mode(m.removesuffix(COMPILED), device)]
    torch.set_grad_enabled(False)
    probe = memory_bandwidth(device)
    print(f"device: {device_name(device)}; {bandwidth_line(probe)}")
    master, tok, _ = load_model_and_tokenizer(args.model, torch.device("cpu"), torch.float32)
    reference = variant(master, "bf16", device)
    ref_logits, codes = frame_logits(reference, tok, args.quality_frames)
    del reference
    models, quality = {}, {}
    # fp32 last, as the master itself: one full-size fp32 copy in memory, not two
    for mode in sorted(modes, key=lambda m: m == "fp32" and device.type == "cpu"):
        last = mode == "fp32" and device.type == "cpu"
        same = next((m for m in models if m.removesuffix(COMPILED) == mode.removesuffix(COMPILED)),
                    None)  # int8 and int8+compile: one model (one copy in memory), two engines
        models[mode] = master if last else models[same] if same else variant(master, mode, device)
        if same:  # the same weights, the same products
            quality[mode] = quality[same]
        else:
            quality[mode] = compare(ref_logits, frame_logits(models[mode], tok,
                                                             args.quality_frames, codes)[0])
        print(f"{mode}: KL {quality[mode]['kl_mean']:.2e}, top-1 {quality[mode]['top1_mean']:.3f}",
              flush=True)
    del master
    gc.collect()
    timed = timed_in_turns(models, tok, device, args.frames, probe)
    rows = []
    for mode in modes:
        row = timed[mode]
        kernels = {m.cpu_kernel for m in models[mode].modules() if isinstance(m, Int8Linear)}
        if kernels:  # the int8 kernel timed fastest at load (FBGEMM or the weight-only one)
            row["int8_kernel"] = ",".join(sorted(kernels))
        rows.append({**row, **quality[mode]})
    base = next((r for r in rows if r["dtype"] == "fp32"), rows[0])
    for r in rows:
        r["speed_vs_" + base["dtype"]] = base["ours_ms"] / r["ours_ms"]
        r["median_speed_vs_" + base["dtype"]] = base["ours_median_ms"] / r["ours_median_ms"]
    print_table(rows, ["dtype", "compiled", "weight_gb_per_frame", "floor_ms", "ours_ms",
                       "ours_median_ms", "ours_over_floor", "speed_vs_" + base["dtype"],
                       "median_speed_vs_" + base["dtype"], "kl_mean", "kl_max_codebook",
                       "top1_mean", "top1_min_codebook"])
    save_json("quantize", device, {"model": args.model, **bandwidth_fields(probe),
                                   "reference": "bf16", "quality_frames": args.quality_frames,
                                   "frames": args.frames, "timing": "in turns, frame by frame",
                                   "rows": rows}, args.out_dir)


if __name__ == "__main__":
    main()
