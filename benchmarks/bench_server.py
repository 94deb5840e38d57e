"""The server under load, and one abusive client beside normal ones.

    .venv/bin/python benchmarks/bench_server.py [--model random:csm-1b] [--clients 1,2,4,8,16,32]
    .venv/bin/python benchmarks/bench_server.py --isolation [--model random:tiny]

- Load (default): `csm-server` as users run it, in a process of its own on a free port, with
  its defaults (watermark on, its context window, compiled where the device compiles; --model,
  --device, a token and enough slots for the most clients are all it is told). For each client
  count, that many concurrent clients stream raw PCM from /v1/audio/speech, --frames frames
  each (125: 10 s, long enough to be steady). Per stream: time to first audio, RTF, and each
  read's lateness against playback (playback starts when the first audio arrives; the audio a
  read brings is due then plus the audio before it). A client count keeps up when every
  stream's 95th-percentile lateness is <= 0 (the worst stream's is `p95_lateness_ms`); in
  aggregate: audio seconds generated per second. The acceptance reads first audio and
  real-time streams from here.
- --isolation (the server in this process: uvicorn on 127.0.0.1, a free port): --normal
  clients (WebSocket, --seconds of audio each) measured three times in one run: alone; beside
  one ordinary client streaming long answers; beside an abuser that sends the longest text
  with the most and longest context turns (and reads its answer) and at the same time fires
  requests with big bodies and hangs up at once. Reported: the normal clients' worst gap
  between chunks and time to first audio, as ratios to the run alone and to the run beside an
  ordinary stream (what any other running stream costs). The three runs are one round;
  --repeats rounds, each figure and ratio the median over them (min, max kept).

Table, JSON and PNG in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from common import (
    ROOT,
    add_model_argument,
    device_name,
    plural,
    print_table,
    save_json,
    summarise,
)
from csm_streaming.options import HelpFormatter

TOKEN = "bench"


def start_server(model: str, device, max_streams: int, settings=None):
    from csm_streaming.engine.config import StreamingConfig
    from csm_streaming.engine.frontend import StreamingGenerator
    from csm_streaming.engine.reference import Generator
    from csm_streaming.model.checkpoints import load_mimi, load_model_and_tokenizer
    from csm_streaming.server.api import ServerSettings
    from csm_streaming.server.app import create_app, serve_in_thread
    from csm_streaming.server.engine_thread import EngineThread

    m, tok, _ = load_model_and_tokenizer(model, device)
    gen = Generator(m, tok, load_mimi("random", device))
    sg = StreamingGenerator(gen, StreamingConfig(max_batch_size=max_streams, max_seq_len=512))
    if sg.needs_warmup:
        sg.warmup(all_buckets=True)
    sched = EngineThread(sg, max_queue=max_streams * 4).start()
    settings = settings or ServerSettings(token=TOKEN)
    server, _, url = serve_in_thread(create_app(sched, settings), settings=settings)
    return server, sched, url


# -- load ------------------------------------------------------------------------------------------

PCM_BYTES_PER_S = 2 * 24_000  # /v1/audio/speech's pcm: 16-bit mono at 24 kHz


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(model: str, device: str, max_streams: int, log_path: Path):
    """`csm-server` in a process of its own with its defaults -> (process, url), once /health
    answers (it loads and warms up before it listens). Its output goes to `log_path`."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "csm_streaming.server.app", "--model", model, "--device", device,
           "--token", TOKEN, "--max-streams", str(max_streams), "--max-queue",
           str(4 * max_streams), "--port", str(port)]
    log = open(log_path, "w")  # noqa: SIM115 (the server writes to it for its whole life)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}  # this checkout's package, installed or not
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log = log  # closed by stop_server
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 3600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"csm-server exited with {proc.returncode} before it listened:\n"
                               + log_path.read_text()[-3000:])
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    stop_server(proc)
    raise RuntimeError("csm-server did not listen within an hour")


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    proc.log.close()


def lateness_s(reads: list[tuple[float, int]]) -> list[float]:
    """Each read (arrival time, bytes) against playback, which starts with the first read: the
    audio a read brings is due at that start plus the audio before it (> 0: late)."""
    start, before, late = reads[0][0], 0, []
    for t, n in reads:
        late.append(t - (start + before / PCM_BYTES_PER_S))
        before += n
    return late


def one_client(url: str, i: int, frames: int) -> dict:
    import httpx

    body = {"input": f"Client {i} is speaking a sentence for the benchmark.", "voice": str(i % 4),
            "response_format": "pcm", "max_audio_length_ms": frames * 80, "seed": i}
    t0 = time.perf_counter()
    reads = []
    with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=3600,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        r.raise_for_status()
        for b in r.iter_bytes():
            if b:
                reads.append((time.perf_counter(), len(b)))
    wall = time.perf_counter() - t0
    n = sum(k for _, k in reads)
    return {"ttfa_s": reads[0][0] - t0, "wall_s": wall, "audio_s": n / PCM_BYTES_PER_S,
            "p95_lateness_s": float(np.percentile(lateness_s(reads), 95))}


def load_run(url: str, counts: list[int], frames: int, repeats: int = 1) -> list[dict]:
    """Each client count `repeats` times: its figures are the medians, with their spread."""
    one_client(url, 999, 2)  # warm-up
    rows = []
    figures = ("aggregate_audio_s_per_s", "mean_rtf", "mean_ttfa_ms", "max_ttfa_ms",
               "p95_lateness_ms")
    for n in counts:
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                res = list(pool.map(lambda i: one_client(url, i, frames), range(n)))
            wall = time.perf_counter() - t0
            audio = sum(r["audio_s"] for r in res)
            runs.append({"aggregate_audio_s_per_s": audio / wall,
                         "mean_rtf": sum(r["wall_s"] / r["audio_s"] for r in res) / n,
                         "mean_ttfa_ms": sum(r["ttfa_s"] for r in res) / n * 1e3,
                         "max_ttfa_ms": max(r["ttfa_s"] for r in res) * 1e3, "wall_s": wall,
                         "p95_lateness_ms": max(r["p95_lateness_s"] for r in res) * 1e3})
        rows.append({"clients": n, **runs[0], **summarise(runs, figures)})
        rows[-1]["keeps_up"] = rows[-1]["p95_lateness_ms"] <= 0  # every stream, median run
        print(f"  {plural(n, 'client')}: {rows[-1]['aggregate_audio_s_per_s']:.3f} audio s/s, "
              f"worst stream's p95 lateness {rows[-1]['p95_lateness_ms']:.0f} ms", flush=True)
    for r in rows:
        r["aggregate_vs_1_client"] = (
            r["aggregate_audio_s_per_s"] / rows[0]["aggregate_audio_s_per_s"]
        )
    return rows


# -- Ray Serve -------------------------------------------------------------------------------------


def ray_run(model: str, replicas: list[int], counts: list[int], frames: int, streams: int) -> list:
    """The load run against Ray Serve with each replica count (one engine per replica)."""
    import socket

    import ray
    from ray import serve

    from csm_streaming.server import ray_serve
    rows = []
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env=ray_serve.runtime_env(remote=False))
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for n in replicas:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
            serve.run(ray_serve.build_app({
                "server_args": ["--model", model, "--no-watermark", "--token", TOKEN],
                "replicas": n, "max_streams": streams, "gpus_per_replica": gpus,
                "cpus_per_replica": 0.5, "torch_threads": max(1, (os.cpu_count() or 2) // n)}),
                name="csm", route_prefix="/")
            for row in load_run(f"http://127.0.0.1:{port}", counts, frames):
                rows.append({"replicas": n, **row})
            serve.delete("csm")
    finally:
        serve.shutdown()
        ray.shutdown()
    for r in rows:  # the same client count with one replica
        one = next(x for x in rows if x["replicas"] == replicas[0] and x["clients"] == r["clients"])
        r["aggregate_vs_1_replica"] = r["aggregate_audio_s_per_s"] / one["aggregate_audio_s_per_s"]
    return rows


# -- isolation -------------------------------------------------------------------------------------


def ws_client(url: str, i: int, seconds: float) -> dict:
    """A normal client: streams over the WebSocket and times every chunk's arrival."""
    from websockets.sync.client import connect

    port = url.rsplit(":", 1)[1]
    with connect(f"ws://127.0.0.1:{port}/v1/stream",
                 additional_headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        t0 = time.perf_counter()
        c.send(json.dumps({"text": f"Normal client {i} is talking for a while now.", "seed": i,
                           "speaker": i % 4, "max_audio_length_ms": seconds * 1000}))
        arrivals = []
        while True:
            m = c.recv(timeout=600)
            if isinstance(m, bytes):
                arrivals.append(time.perf_counter())
            elif json.loads(m)["type"] in ("done", "error"):
                break
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {
        "ttfa_s": arrivals[0] - t0,
        "worst_gap_s": max(gaps),
        "median_gap_s": statistics.median(gaps),
    }


def abuser_body(settings, window: int) -> dict:
    """The longest text and the most context turns the server accepts, the turns as long as the
    window can use (longer ones would be dropped before they cost any encoding)."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    turn_s = min(settings.max_context_audio_s, window * 0.08 / settings.max_context)
    turn = (0.1 * rng.standard_normal(int(turn_s * 24_000))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, turn, 24_000, format="FLAC")
    audio = base64.b64encode(buf.getvalue()).decode()
    text = ("This request is as long as the server allows, sentence after sentence. " * 40)
    return {"text": text[:settings.max_text_chars], "max_audio_length_ms": 8000, "context": [
        {"speaker": k % 2, "text": "An earlier turn.", "audio_base64": audio}
        for k in range(settings.max_context)]}


def abuse(url: str, body: dict, stop: threading.Event):
    """One open request with everything, and fire-and-forget copies of it, until `stop`."""
    import httpx

    def reader():
        while not stop.is_set():
            httpx.post(f"{url}/api/generate", json=body, timeout=600,
                       headers={"Authorization": f"Bearer {TOKEN}"})

    host, port = url.rsplit("/", 1)[1].split(":")
    raw = json.dumps(body).encode()
    head = (f"POST /api/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n").encode()
    threading.Thread(target=reader, daemon=True).start()
    while not stop.is_set():
        with socket.create_connection((host, int(port))) as s:
            s.sendall(head + raw)  # and hang up without reading
        stop.wait(0.5)


ISOLATION_RUNS = ("alone", "beside a long stream", "beside an abuser")


def isolation_run(url: str, settings, window: int, normal: int, seconds: float,
                  repeats: int) -> list[dict]:
    """`repeats` rounds of the three runs side by side; each figure and each ratio (taken within
    its round) is the median over the rounds, with its spread."""
    ws_client(url, 99, 0.4)  # warm-up
    rounds = [isolation_round(url, settings, window, normal, seconds) for _ in range(repeats)]
    rows = []
    for i, label in enumerate(ISOLATION_RUNS):
        runs = [r[i] for r in rounds]
        figures = [k for k in runs[0] if k not in ("run", "clients")]
        rows.append({"run": label, "clients": normal, **summarise(runs, figures)})
    return rows


def isolation_round(url: str, settings, window: int, normal: int, seconds: float) -> list[dict]:
    rows = []
    for label in ISOLATION_RUNS:
        stop = threading.Event()
        if label == "beside a long stream":  # what any other stream costs, abusive or not
            threading.Thread(target=ordinary, args=(url, stop), daemon=True).start()
            time.sleep(1.0)
        elif label == "beside an abuser":
            body = abuser_body(settings, window)
            threading.Thread(target=abuse, args=(url, body, stop), daemon=True).start()
            time.sleep(1.0)  # its first requests are in
        with ThreadPoolExecutor(normal) as pool:
            res = list(pool.map(lambda i: ws_client(url, i, seconds), range(normal)))
        stop.set()
        rows.append({"run": label, "clients": normal,
                     "worst_gap_ms": max(r["worst_gap_s"] for r in res) * 1e3,
                     "median_gap_ms": statistics.median(r["median_gap_s"] for r in res) * 1e3,
                     "mean_ttfa_ms": statistics.mean(r["ttfa_s"] for r in res) * 1e3,
                     "max_ttfa_ms": max(r["ttfa_s"] for r in res) * 1e3})
        print(f"  {label}: worst gap {rows[-1]['worst_gap_ms']:.0f} ms, "
              f"mean first audio {rows[-1]['mean_ttfa_ms']:.0f} ms", flush=True)
        time.sleep(3.0)  # the abuser's requests drain
    for row in rows[1:]:
        for key in ("worst_gap_ms", "mean_ttfa_ms", "max_ttfa_ms"):
            row[f"{key}_ratio"] = row[key] / rows[0][key]
    rows[2]["worst_gap_ms_vs_long_stream"] = rows[2]["worst_gap_ms"] / rows[1]["worst_gap_ms"]
    rows[2]["mean_ttfa_ms_vs_long_stream"] = rows[2]["mean_ttfa_ms"] / rows[1]["mean_ttfa_ms"]
    return rows


def ordinary(url: str, stop: threading.Event):
    """One ordinary client streaming long answers, one after another, until `stop`."""
    import httpx

    while not stop.is_set():
        httpx.post(
            f"{url}/api/generate",
            timeout=600,
            headers={"Authorization": f"Bearer {TOKEN}"},
            json={"text": "An ordinary long answer, read to the end.", "max_audio_length_ms": 8000},
        )


def plot(path, rows, counts, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(counts, [r["aggregate_audio_s_per_s"] for r in rows], "o-")
    a.set(
        xscale="log",
        xlabel="concurrent clients",
        ylabel="audio seconds / second",
        title="Aggregate",
    )
    b.plot(counts, [r["mean_ttfa_ms"] for r in rows], "o-", label="mean")
    b.plot(counts, [r["max_ttfa_ms"] for r in rows], "s--", label="max")
    b.set(xscale="log", xlabel="concurrent clients", ylabel="ms", title="Time to first audio")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=100)
    print(f"saved {path.with_suffix('.png').name}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    add_model_argument(p, default="random:csm-1b")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--clients", default="1,2,4,8,16,32", help="client counts of the load run")
    p.add_argument("--frames", type=int, default=125,
                   help="frames each load client asks for (125: 10 s of audio)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each client count (the median is the figure; min, max kept)")
    p.add_argument("--ray", action="store_true",
                   help="the load run on Ray Serve, with each of --replicas (default clients 8,16)")
    p.add_argument("--replicas", default="1,2", help="replica counts of the --ray run")
    p.add_argument("--isolation", action="store_true",
                   help="measure normal clients alone and beside an abusive one instead")
    p.add_argument("--normal", type=int, default=8, help="normal clients of the isolation run")
    p.add_argument("--seconds", type=float, default=4.0, help="audio each normal client asks for")
    p.add_argument(
        "--out-dir", default=None, help="where JSON and PNG go (default benchmarks/results)"
    )
    return p


def main_ray(args, device, counts):
    if args.clients == build_parser().get_default("clients"):
        counts = [8, 16]
    rows = ray_run(args.model, [int(r) for r in args.replicas.split(",")], counts, args.frames,
                   max(counts))  # every replica can hold every client: no one queues in Serve
    print_table(rows, ["replicas", "clients", "aggregate_audio_s_per_s", "aggregate_vs_1_replica",
                       "mean_rtf", "mean_ttfa_ms", "max_ttfa_ms"])
    save_json("server_ray", device, {"model": args.model, "frames": args.frames, "rows": rows,
                                     "cpu_count": os.cpu_count()}, args.out_dir)


def main(argv=None):
    args = build_parser().parse_args(argv)
    from csm_streaming.engine.loader import pick_device
    from csm_streaming.server.api import ServerSettings

    device = pick_device(args.device)
    counts = [int(c) for c in args.clients.split(",")]
    if args.ray:
        return main_ray(args, device, counts)
    if not args.isolation:
        return main_load(args, device, counts)
    settings = ServerSettings(token=TOKEN, max_context=8, max_context_audio_s=60)
    server, sched, url = start_server(args.model, device, args.normal + 2, settings)
    try:
        rows = isolation_run(url, settings, sched.engine.window, args.normal, args.seconds,
                             args.repeats)
    finally:
        server.should_exit = True
        sched.stop()
    print_table(rows, ["run", "clients", "worst_gap_ms", "median_gap_ms", "mean_ttfa_ms",
                       "max_ttfa_ms", "worst_gap_ms_ratio", "mean_ttfa_ms_ratio",
                       "worst_gap_ms_vs_long_stream", "mean_ttfa_ms_vs_long_stream"])
    save_json("server_isolation", device, {"model": args.model, "seconds": args.seconds,
                                           "repeats": args.repeats, "rows": rows}, args.out_dir)


def main_load(args, device, counts):
    """The load run against `csm-server` in a process of its own (spawn_server)."""
    with tempfile.TemporaryDirectory(prefix="csm-bench-server-") as tmp:
        log = Path(tmp) / "server.log"
        proc, url = spawn_server(args.model, args.device, max(counts), log)
        try:
            rows = load_run(url, counts, args.frames, args.repeats)
        finally:
            stop_server(proc)
    print_table(rows, ["clients", "aggregate_audio_s_per_s", "aggregate_vs_1_client", "mean_rtf",
                       "mean_ttfa_ms", "max_ttfa_ms", "p95_lateness_ms", "keeps_up"])
    keeping = [r["clients"] for r in rows if r["keeps_up"]]
    print(f"real-time streams (every stream's p95 lateness <= 0): {max(keeping, default=0)}")
    path = save_json("server", device, {"model": args.model, "frames": args.frames,
                                        "server": "csm-server, its defaults", "rows": rows,
                                        "realtime_streams": max(keeping, default=0)},
                     args.out_dir)
    plot(path, rows, counts, f"CSM-1B server, random weights, {device_name(device)}")


if __name__ == "__main__":
    main()
