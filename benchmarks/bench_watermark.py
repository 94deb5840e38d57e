"""What the watermark costs: latency added to the first audio, and time per second of audio.

    .venv/bin/python benchmarks/bench_watermark.py [--device auto]

silentcipher's own classes with random weights (the same compute as the published model):
marks windows of the sizes a stream uses (StreamMarker: the first chunk alone, then doubling
up to 2 s) and a whole 10 s utterance, best of a few runs after a warm-up call. Prints a table,
saves benchmarks/results/watermark_<device>.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import print_table, save_json, spread, sync
from csm_streaming.options import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (silentcipher runs "
                                                    "on cuda or cpu)")
    p.add_argument("--repeats", type=int, default=3, help="runs per window size (the best is kept)")
    p.add_argument(
        "--out-dir", default=None, help="where the JSON goes (default benchmarks/results)"
    )
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from csm_streaming.engine.loader import pick_device
    from csm_streaming.model.watermark import build_random_watermarker, watermark

    device = pick_device(args.device)
    wm = build_random_watermarker(tempfile.mkdtemp(), device)
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    watermark(wm, torch.randn(24_000, generator=g) * 0.1, 24_000, None)
    warmup_s = time.perf_counter() - t
    rows = []
    for ms in (160, 320, 640, 1280, 2000, 10_000):
        audio = torch.randn(ms * 24, generator=g) * 0.1
        times = []
        for _ in range(args.repeats):
            sync(device)
            t = time.perf_counter()
            watermark(wm, audio, 24_000, None)
            sync(device)
            times.append(time.perf_counter() - t)
        best = min(times)
        rows.append(
            {
                "window_ms": ms,
                "mark_ms": best * 1e3,
                "ms_per_audio_s": best * 1e3 / (ms / 1000),
                "rtf_of_marking": best / (ms / 1000),
                "spread": {"mark_ms": spread([t * 1e3 for t in times])},
            }
        )
    print(f"first call (librosa/numba warm-up): {warmup_s:.1f} s")
    print_table(rows, ["window_ms", "mark_ms", "ms_per_audio_s", "rtf_of_marking"])
    first = rows[0]
    print(f"added to the first audio (160 ms first chunk): {first['mark_ms']:.0f} ms")
    save_json("watermark", device, {"warmup_s": warmup_s, "rows": rows,
                                    "first_chunk_added_latency_ms": first["mark_ms"]}, args.out_dir)


if __name__ == "__main__":
    main()
