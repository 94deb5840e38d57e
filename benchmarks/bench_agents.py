"""A voice agent's view: an LLM's reply streamed token by token into one Cartesia context.

    .venv/bin/python benchmarks/bench_agents.py [--model random:tiny] [--clients 1,8]

Starts the real server (uvicorn on 127.0.0.1) over random weights. Each client opens
/tts/websocket and feeds one context the way an agent does: the reply's words cut into
LLM-like tokens (a leading space, about four characters each) at --tokens-per-s, then
`continue: false`. Measured per client:

- first_phrase_ms: from the moment the first phrase's text is complete (the token that ends
  its sentence or clause was sent) to its first audio; against the same phrase sent whole to
  /v1/audio/speech (pcm) by as many clients at once, time to the first byte, the two taking
  turns round by round (goal: no later than the speech route's + one frame, 80 ms).
- A listener playing the chunks in real time as they arrive, from the first one:
  start_gap_ms, the silence right after the first chunk (a small first chunk buys early audio;
  a player's prebuffer hides it), and later_gap_ms, the longest silence after that, across the
  phrases (goal: 0 while the text comes faster than it is spoken).

Then the same with --clients at once (the worst client of each round reported). Random weights
never end a phrase by themselves, so each phrase runs to its frame cap: more audio per phrase
than real speech, the harder case for gaps. Table and JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from bench_server import TOKEN, start_server
from common import add_model_argument, print_table, save_json, spread
from csm_streaming.options import HelpFormatter

REPLY = ("Sure, I can help with that. The train leaves at nine in the morning, and the trip "
         "takes about two hours. Bring a jacket, because it gets cold by the sea.")
FRAME_S = 0.08


def llm_tokens(text: str) -> list[str]:
    """Pieces as an LLM streams them: words with their leading space, long ones split."""
    out = []
    for word in re.findall(r"\s*\S+", text):
        while len(word) > 5:
            out.append(word[:4])
            word = word[4:]
        out.append(word)
    return out


def first_phrase(text: str) -> str:
    """The first phrase the server speaks: up to the first clause or sentence end (at least 12
    characters, as TextChunker cuts a first piece)."""
    m = re.search(r"^.{12,}?[,.!?;:](?=\s)", text)
    return m.group(0) if m else text


def agent_client(url: str, tokens_per_s: float, cid: str) -> dict:
    """One agent turn over the Cartesia socket; times in seconds from its first token."""
    from websockets.sync.client import connect

    phrase = first_phrase(REPLY)
    base = {"model_id": "bench", "voice": {"mode": "id", "id": "0"}, "language": "en",
            "output_format": {"container": "raw", "encoding": "pcm_s16le",
                              "sample_rate": 24000}, "context_id": cid}
    arrivals, phrase_done = [], {}
    ws_url = url.replace("http", "ws") + f"/tts/websocket?api_key={TOKEN}"
    with connect(ws_url, max_size=None) as ws:
        t0 = time.perf_counter()

        def feed():
            sent = ""
            for tok in llm_tokens(REPLY):
                ws.send(json.dumps({**base, "transcript": tok, "continue": True}))
                sent += tok
                if "t" not in phrase_done and len(sent.strip()) >= len(phrase):
                    phrase_done["t"] = time.perf_counter() - t0
                time.sleep(1 / tokens_per_s)
            ws.send(json.dumps({**base, "transcript": "", "continue": False}))

        feeder = threading.Thread(target=feed)
        feeder.start()
        while True:
            m = json.loads(ws.recv(timeout=300))
            if m["type"] == "chunk":
                arrivals.append((time.perf_counter() - t0, len(m["data"]) * 3 // 4 // 2))
            elif m["type"] in ("done", "error"):
                break
        feeder.join()
    gaps = playback_gaps(arrivals)
    return {"first_phrase_ms": (arrivals[0][0] - phrase_done["t"]) * 1000,
            "start_gap_ms": gaps[1] * 1000 if len(gaps) > 1 else 0.0,
            "later_gap_ms": max(gaps[2:], default=0.0) * 1000,
            "audio_s": sum(n for _, n in arrivals) / 24000}


def playback_gaps(arrivals: list[tuple[float, int]]) -> list[float]:
    """The silence before each chunk of a player that starts at the first chunk and plays
    each chunk in real time as soon as it has it."""
    played_until, gaps = arrivals[0][0], []
    for t, samples in arrivals:
        gaps.append(max(0.0, t - played_until))
        played_until = max(played_until, t) + samples / 24000
    return gaps


def at_once(fn, n: int) -> list:
    """fn(i) for i < n on n threads at once; their results."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(fn, range(n)))


def speech_route_first_byte(url: str, text: str) -> float:
    import httpx

    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/audio/speech", timeout=300,
                      headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"input": text, "voice": "0", "response_format": "pcm"}) as r:
        for _ in r.iter_raw():
            return (time.perf_counter() - t0) * 1000
    raise RuntimeError("the speech route sent no audio")


def run(url: str, clients: int, tokens_per_s: float, rounds: int) -> dict:
    firsts, starts, laters, baselines = [], [], [], []
    for r in range(rounds):  # the speech route and the agents take turns, as many at once
        baselines.append(max(at_once(
            lambda i: speech_route_first_byte(url, first_phrase(REPLY)), clients)))
        results = at_once(lambda i, r=r: agent_client(url, tokens_per_s, f"r{r}-c{i}"), clients)
        firsts.append(max(x["first_phrase_ms"] for x in results))
        starts.append(max(x["start_gap_ms"] for x in results))
        laters.append(max(x["later_gap_ms"] for x in results))
    baseline, first = statistics.median(baselines), statistics.median(firsts)
    return {"clients": clients, "first_phrase_ms": first, "speech_route_ttfb_ms": baseline,
            "first_phrase_minus_speech_route_ms": first - baseline,
            "goal_first_audio_met": first <= baseline + FRAME_S * 1000,
            "start_gap_ms": statistics.median(starts), "later_gap_ms": max(laters),
            "goal_no_gap_between_phrases_met": max(laters) == 0.0,
            "spread": {"first_phrase_ms": spread(firsts), "speech_route_ttfb_ms":
                       spread(baselines), "start_gap_ms": spread(starts),
                       "later_gap_ms": spread(laters)}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    add_model_argument(p, default="random:tiny")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--clients", default="1,8", help="agents at once, comma-separated")
    p.add_argument("--tokens-per-s", type=float, default=15.0, help="the LLM's speed")
    p.add_argument("--rounds", type=int, default=3, help="rounds per client count")
    p.add_argument("--out-dir", default=None, help="where the JSON goes")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from csm_streaming.engine.loader import pick_device

    device = pick_device(args.device)
    counts = [int(c) for c in args.clients.split(",")]
    server, sched, url = start_server(args.model, device, max(counts))
    try:
        rows = [run(url, n, args.tokens_per_s, args.rounds) for n in counts]
    finally:
        server.should_exit = True
        sched.stop()
    print_table(rows, ["clients", "first_phrase_ms", "speech_route_ttfb_ms",
                       "first_phrase_minus_speech_route_ms", "goal_first_audio_met",
                       "start_gap_ms", "later_gap_ms", "goal_no_gap_between_phrases_met"])
    save_json("agents", device, {"model": args.model, "tokens_per_s": args.tokens_per_s,
                                 "reply": REPLY, "rounds": args.rounds, "rows": rows},
              args.out_dir)


if __name__ == "__main__":
    main()
