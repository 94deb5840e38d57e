"""The server under load: aggregate audio per second against concurrent clients.

    .venv/bin/python benchmarks/bench_server.py [--model csm-1b] [--clients 1,2,4,8,16,32] [--frames 6]

Starts the real server (uvicorn on 127.0.0.1, a free port) with the random model, then for each
client count runs that many concurrent clients, each streaming raw PCM from /v1/audio/speech for
--frames frames. Per stream: time to first audio (first bytes) and RTF (wall time / audio time);
in aggregate: audio seconds generated per second. Table, JSON and PNG in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from common import device_name, print_table, save_json


def start_server(model: str, device, max_streams: int):
    from api import ServerSettings
    from checkpoints import load_mimi, load_model_and_tokenizer
    from generator import Generator
    from scheduler import Scheduler
    from server import create_app, serve_in_thread
    from streaming_generator import StreamingConfig, StreamingGenerator

    m, tok, _ = load_model_and_tokenizer(f"random:{model}", device)
    gen = Generator(m, tok, load_mimi("random", device))
    sg = StreamingGenerator(gen, StreamingConfig(max_batch_size=max_streams, max_seq_len=512))
    sched = Scheduler(sg, max_queue=max_streams).start()
    server, _, url = serve_in_thread(create_app(sched, ServerSettings()))
    return server, sched, url


def one_client(url: str, i: int, frames: int) -> dict:
    import httpx

    body = {"input": f"Client {i} is speaking a sentence for the benchmark.", "voice": str(i % 4),
            "response_format": "pcm", "max_audio_length_ms": frames * 80, "seed": i}
    t0 = time.perf_counter()
    first = None
    n = 0
    with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=3600) as r:
        r.raise_for_status()
        for b in r.iter_bytes():
            if first is None and b:
                first = time.perf_counter() - t0
            n += len(b)
    wall = time.perf_counter() - t0
    audio_s = n / 2 / 24_000
    return {"ttfa_s": first, "wall_s": wall, "audio_s": audio_s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="csm-1b")
    p.add_argument("--device", default="auto")
    p.add_argument("--clients", default="1,2,4,8,16,32")
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    from generator import pick_device

    device = pick_device(args.device)
    counts = [int(c) for c in args.clients.split(",")]
    server, sched, url = start_server(args.model, device, max(counts))
    rows = []
    try:
        one_client(url, 999, 2)  # warm-up (and compile / capture on cuda)
        for n in counts:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                res = list(pool.map(lambda i: one_client(url, i, args.frames), range(n)))
            wall = time.perf_counter() - t0
            audio = sum(r["audio_s"] for r in res)
            row = {"clients": n, "aggregate_audio_s_per_s": audio / wall,
                   "mean_rtf": sum(r["wall_s"] / r["audio_s"] for r in res) / n,
                   "mean_ttfa_ms": sum(r["ttfa_s"] for r in res) / n * 1e3,
                   "max_ttfa_ms": max(r["ttfa_s"] for r in res) * 1e3, "wall_s": wall}
            rows.append(row)
            print(f"  {n} clients: {row['aggregate_audio_s_per_s']:.3f} audio s/s, "
                  f"rtf {row['mean_rtf']:.2f}, ttfa {row['mean_ttfa_ms']:.0f} ms")
    finally:
        server.should_exit = True
        sched.stop()
    base = rows[0]["aggregate_audio_s_per_s"]
    for r in rows:
        r["aggregate_vs_1_client"] = r["aggregate_audio_s_per_s"] / base
    print_table(rows, ["clients", "aggregate_audio_s_per_s", "aggregate_vs_1_client", "mean_rtf",
                       "mean_ttfa_ms", "max_ttfa_ms"])
    path = save_json("server", device, {"model": args.model, "frames": args.frames, "rows": rows},
                     args.out_dir)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(counts, [r["aggregate_audio_s_per_s"] for r in rows], "o-")
    a.set(xscale="log", xlabel="concurrent clients", ylabel="audio seconds / second", title="Aggregate")
    b.plot(counts, [r["mean_ttfa_ms"] for r in rows], "o-", label="mean")
    b.plot(counts, [r["max_ttfa_ms"] for r in rows], "s--", label="max")
    b.set(xscale="log", xlabel="concurrent clients", ylabel="ms", title="Time to first audio")
    b.legend()
    fig.suptitle(f"CSM-1B server, random weights, {device_name(device)}")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=100)
    print(f"saved {path.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
