"""One client must never hurt another: each item of the isolation work, over real HTTP/WebSocket.

The server runs in this process (uvicorn on 127.0.0.1) over random:tiny, with small limits so
the tests are quick. Faults are injected where they would really happen: a text segment whose
prompt fails, an out-of-memory inside a chunk, a client that leaves or never reads.
"""

import base64
import io
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import AUTH, TOKEN, LiveServer, patch_sample_frame, speech_like
from csm_streaming.request import GenerationRequest, Segment
from csm_streaming.server.api import ServerSettings

SR = 24_000


@pytest.fixture(scope="module")
def iso():
    s = LiveServer(max_streams=8, settings=ServerSettings(
        token=TOKEN, max_body_bytes=2 * 2**20, header_timeout_s=1.0, write_timeout_s=1.5,
        max_context_audio_s=15))
    yield s
    s.close()


def wait_idle(live, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(f"{live.url}/health").json()
        if h["active_streams"] == 0 and h["queued"] == 0:
            return time.monotonic()
        time.sleep(0.05)
    pytest.fail(f"streams still held: {h}")


def metric(live, name, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{live.url}/metrics", headers=AUTH).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def pcm_to_float(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767)


def quantized(audio):
    return torch.from_numpy(np.clip(audio.numpy(), -1, 1) * 32767).round() / 32767


LONG_TEXT = " ".join(f"Sentence number {i} makes this text long." for i in range(9))  # > 250 chars


# -- 1. a request that fails ends alone, and never looks complete ---------------------------------


def test_a_segment_that_cannot_fit_is_refused_before_admission(iso):
    text = "A short start. " + "word " * 380  # the second sentence alone overflows the window
    r = httpx.post(f"{iso.url}/api/generate", headers=AUTH, timeout=60, json={"text": text})
    assert r.status_code == 400 and "segment 2" in r.json()["error"]["message"]
    r = httpx.post(f"{iso.url}/api/generate", headers=AUTH, timeout=60,  # 40 s > the tiny window
                   json={"text": "Short.", "max_audio_length_ms": 45000})
    assert r.status_code == 400 and "lower max_audio_length_ms" in r.json()["error"]["message"]


def test_a_stream_that_fails_ends_alone_and_visibly_on_every_transport(iso, tiny_generator,
                                                                       monkeypatch):
    """Streams with seed 666 end their first sentence at frame 5 and the prompt of their second
    fails. Each transport shows the failure; the clients beside them get exactly their solo
    audio."""
    from websockets.sync.client import connect

    prompts = iso.engine_thread.engine.prompts
    original = prompts._next

    def failing_next(s):
        if s.request.sampling.seed == 666:
            raise RuntimeError("injected: the second sentence failed")
        yield from original(s)

    monkeypatch.setattr(prompts, "_next", failing_next)
    undo = patch_sample_frame(iso.engine_thread.engine.model, lambda codes, s: torch.where(
        ((s.seed == 666) & (s.frame == 5))[:, None], torch.zeros_like(codes), codes))
    before_ok = metric(iso, "csm_requests_total", route="/v1/audio/speech", status="200")
    victim = {"input": LONG_TEXT, "seed": 666, "max_audio_length_ms": 8000}

    def raw_pcm():
        with httpx.stream("POST", f"{iso.url}/v1/audio/speech", headers=AUTH, timeout=60,
                          json={**victim, "response_format": "pcm"}) as r:
            assert r.status_code == 200
            got = b""
            with pytest.raises(httpx.RemoteProtocolError):  # cut, not ended
                for b in r.iter_bytes():
                    got += b
        return got

    def sse():
        with httpx.stream("POST", f"{iso.url}/v1/audio/speech", headers=AUTH, timeout=60,
                          json={**victim, "stream_format": "sse"}) as r:
            return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]

    def ws():
        with connect(f"ws://127.0.0.1:{iso.port}/v1/stream", additional_headers=AUTH) as c:
            c.send(json.dumps({"text": LONG_TEXT, "seed": 666, "max_audio_length_ms": 8000}))
            msgs = []
            while not msgs or msgs[-1].get("type") not in ("done", "error"):
                m = c.recv(timeout=60)
                msgs.append({"type": "audio"} if isinstance(m, bytes) else json.loads(m))
            return msgs

    def normal(i):
        body = {"input": f"Client {i} speaks.", "voice": str(i), "seed": i, "top_k": 1 + 20 * i,
                "response_format": "pcm", "max_audio_length_ms": 1200}
        r = httpx.post(f"{iso.url}/v1/audio/speech", headers=AUTH, timeout=120, json=body)
        return r.status_code, pcm_to_float(r.content)

    try:
        with ThreadPoolExecutor(7) as pool:
            jobs = [pool.submit(f) for f in (raw_pcm, sse, ws)] + \
                   [pool.submit(normal, i) for i in range(1, 5)]
            pcm, events, msgs = (j.result(timeout=120) for j in jobs[:3])
            normals = [j.result(timeout=120) for j in jobs[3:]]
        generate = httpx.post(f"{iso.url}/api/generate", headers=AUTH, timeout=60,
                              json={"text": LONG_TEXT, "seed": 666, "max_audio_length_ms": 8000})
    finally:
        undo()
    assert len(pcm) == 5 * 1920 * 2  # the first sentence came, then the body was cut
    assert events[-1]["type"] == "error" and "second sentence" in events[-1]["message"]
    assert not any(e["type"] == "speech.audio.done" for e in events)
    assert msgs[-1]["type"] == "error" and msgs[-1]["status"] == 500
    assert generate.status_code == 500 and "second sentence" in generate.json()["error"]["message"]
    for i, (status, audio) in enumerate(normals, start=1):
        solo = tiny_generator.generate(f"Client {i} speaks.", i, max_audio_length_ms=1200, seed=i,
                                       topk=1 + 20 * i)
        assert status == 200
        torch.testing.assert_close(audio, quantized(solo), atol=1.5 / 32767, rtol=0)
    # the cut stream is counted once, as a failure, never as a 200 as well
    assert (
        metric(iso, "csm_requests_total", route="/v1/audio/speech", status="200") == before_ok + 4
    )
    assert metric(iso, "csm_requests_total", route="/v1/audio/speech", status="500") >= 2


# -- 2. preparing a big context does not stall the running streams --------------------------------


def test_a_big_context_does_not_stall_the_running_streams(iso, monkeypatch):
    """The big context is encoded in slices between the running stream's chunks, never in one
    piece that every stream would wait for. Shown by the engine's own order of work (one
    thread does both), not by timing the gaps, which depends on the machine's load."""
    from websockets.sync.client import connect

    from csm_streaming.engine import prompt_prefill as prompts

    engine = iso.engine_thread.generator.engine
    work = []  # the engine thread's order of work: "slice" (context encoding) or "chunk"
    encode, chunk = prompts.encode_slices, engine._chunk

    def slices(*a):
        for piece in encode(*a):
            work.append("slice")
            yield piece

    monkeypatch.setattr(prompts, "encode_slices", slices)
    monkeypatch.setattr(engine, "_chunk", lambda streams: work.append("chunk") or chunk(streams))
    context = speech_like(8.0, seed=3)
    buf = io.BytesIO()
    sf.write(buf, context.numpy(), SR, format="WAV")
    abuser = {
        "text": "Now me.",
        "max_audio_length_ms": 160,
        "context": [
            {
                "speaker": 1,
                "text": "A long turn.",
                "audio_base64": base64.b64encode(buf.getvalue()).decode(),
            }
        ],
    }
    result = {}
    with connect(f"ws://127.0.0.1:{iso.port}/v1/stream", additional_headers=AUTH) as c:
        c.send(json.dumps({"text": "I keep talking.", "seed": 4, "max_audio_length_ms": 12000}))
        received = 0
        while received < 3:
            if isinstance(c.recv(timeout=60), bytes):
                received += 1

        def post():
            r = httpx.post(f"{iso.url}/api/generate", headers=AUTH, timeout=120, json=abuser)
            result.update(status=r.status_code)

        thread = threading.Thread(target=post)
        thread.start()
        while True:
            m = c.recv(timeout=60)
            if not isinstance(m, bytes) and json.loads(m)["type"] == "done":
                break
        thread.join(120)
    assert result["status"] == 200
    first, last = work.index("slice"), len(work) - 1 - work[::-1].index("slice")
    assert work.count("slice") > 1  # in slices, not in one piece
    assert work[first:last].count("chunk") >= 2, work  # the stream went on meanwhile


# -- 3. a small file cannot expand into gigabytes --------------------------------------------------


def b64_audio(data, rate, fmt="WAV", subtype=None) -> str:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt, subtype=subtype)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("rate, channels, seconds, fmt, words", [
    (655_350, 8, 0.2, "FLAC", "655350 Hz is outside"), (48_000, 9, 0.1, "WAV", "9 channels"),
    (8_000, 1, 16.0, "FLAC", "the limit is 15 s")])
def test_absurd_context_audio_is_refused_from_its_header(iso, rate, channels, seconds, fmt, words):
    data = np.zeros((int(rate * seconds), channels), dtype=np.float32)  # small as a file
    audio = b64_audio(data, rate, fmt=fmt)
    body = {"text": "hi", "context": [{"speaker": 0, "text": "a", "audio_base64": audio}]}
    r = httpx.post(f"{iso.url}/api/generate", headers=AUTH, timeout=60, json=body)
    assert r.status_code == 400 and words in r.json()["error"]["message"]


def test_decoding_is_mixed_to_mono_in_blocks(tmp_path):
    """30 s of 96 kHz x 8 channels is 92 MB decoded; reading it for the model keeps far less."""
    import tracemalloc

    from csm_streaming.audio import AudioLimits, read_audio

    path = tmp_path / "big.flac"
    with sf.SoundFile(path, "w", 96_000, 8, format="FLAC") as f:
        block = np.zeros((96_000, 8), dtype=np.float32)
        block[:, 3] = 0.1
        for _ in range(30):
            f.write(block)
    raw = path.read_bytes()
    tracemalloc.start()
    mono, rate = read_audio(raw, mono=True, limits=AudioLimits(max_seconds=60))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rate == 96_000 and mono.shape == (30 * 96_000,)
    assert float(mono.max()) == pytest.approx(0.1 / 8, rel=1e-3)
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.0f} MB"


# -- 4. a client that leaves /api/generate frees its slot ------------------------------------------


def test_fire_and_forget_requests_are_cancelled(iso):
    before = metric(iso, "csm_requests_total", route="/api/generate", status="499")
    body = json.dumps(
        {"text": "Nobody will listen to this.", "max_audio_length_ms": 30000}
    ).encode()
    head = (f"POST /api/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    for _ in range(8):
        with socket.create_connection(("127.0.0.1", iso.port)) as s:
            s.sendall(head + body)
            time.sleep(0.05)
    t = time.monotonic()
    assert wait_idle(iso) - t < 10
    deadline = time.monotonic() + 10
    while metric(iso, "csm_requests_total", route="/api/generate", status="499") < before + 8:
        assert time.monotonic() < deadline, "not every request was counted as left"
        time.sleep(0.1)


# -- 5. metrics cannot be broken or flooded through the path --------------------------------------


def test_metrics_label_by_route_template(iso):
    from prometheus_client.parser import text_string_to_metric_families

    rng = random.Random(0)
    paths = ['/a"b', "/x\\y", "/{}"] + [f"/p{rng.randrange(10**9)}" for _ in range(100)]
    with httpx.Client(base_url=iso.url, headers=AUTH) as c:
        for p in paths:
            assert c.get(p).status_code == 404
    text = httpx.get(f"{iso.url}/metrics", headers=AUTH).text
    routes = {s.labels["route"] for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "csm_requests_total"}  # parses: the exposition is well formed
    assert routes <= {
        "/api/generate",
        "/v1/audio/speech",
        "/v1/stream",
        "/metrics",
        "/health",
        "other",
    }
    assert metric(iso, "csm_requests_total", route="other", status="404") >= len(paths)


# -- 6. input errors are 4xx JSON, never 500 -------------------------------------------------------


def test_strange_input_is_a_4xx_not_a_500(iso):
    from websockets.sync.client import connect

    def post(path, raw=None, headers=AUTH, **body):
        return httpx.post(f"{iso.url}{path}", headers=headers, timeout=60,
                          **({"content": raw} if raw else {"json": body}))

    r = post("/api/generate", raw=b'{"text": "bad \\ud800 surrogate"}')
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]["message"]
    with connect(f"ws://127.0.0.1:{iso.port}/v1/stream", additional_headers=AUTH) as c:
        c.send('{"text": "bad \\ud800 surrogate"}')
        err = json.loads(c.recv(timeout=30))
    assert err["status"] == 400 and "not valid Unicode" in err["message"]
    r = post("/api/generate", text="hi", temperature=1e308)
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = post("/v1/audio/speech", input="hi", voice="\u00b2")
    assert r.status_code == 400 and "unknown voice" in r.json()["error"]["message"]
    r = post("/api/generate", headers={"Authorization": b"Bearer \xff\xfe\xc3"}, text="hi")
    assert r.status_code == 401
    r = httpx.post(f"{iso.url}/api/generate?token={TOKEN}", json={"text": "hi"}, timeout=30)
    assert r.status_code == 401  # query tokens are not accepted (they end up in logs)
    with connect(f"ws://127.0.0.1:{iso.port}/v1/stream?token=%C3%A9") as c:
        c.send(json.dumps({"text": "hi", "token": "\u00e9\ud800"}))
        err = json.loads(c.recv(timeout=30))
    assert err["type"] == "error" and err["status"] == 401


# -- 7. bodies, messages and connections are bounded -----------------------------------------------


def test_a_chunked_body_is_capped_while_it_is_read(iso):
    with socket.create_connection(("127.0.0.1", iso.port)) as s:
        s.sendall((f"POST /api/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                   "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
        chunk = b"A" * 65536
        sent, answer = 0, b""
        s.settimeout(0.01)
        try:
            while sent < 8 * 2**20 and b"\r\n\r\n" not in answer:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                try:
                    answer += s.recv(65536)
                except TimeoutError:
                    pass
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.settimeout(5)
        while b"\r\n\r\n" not in answer:
            answer += s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413") and sent < 4 * 2**20


def test_a_websocket_message_over_the_limit_closes_the_socket(iso):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{iso.port}/v1/stream", additional_headers=AUTH,
                 max_size=None) as c:
        c.send(json.dumps({"text": "x" * (3 * 2**20)}))
        with pytest.raises(ConnectionClosed) as e:
            c.recv(timeout=30)
    assert e.value.rcvd.code == 1009  # message too big


def test_slow_and_idle_connections_are_closed(iso):
    socks = [socket.create_connection(("127.0.0.1", iso.port)) for _ in range(20)]
    for s in socks:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the rest of the head never comes
        s.settimeout(5)
    t = time.monotonic()
    assert all(s.recv(100) == b"" for s in socks)  # closed by the server
    assert time.monotonic() - t < 4
    for s in socks:
        s.close()


def test_a_reader_that_never_reads_is_dropped(iso):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", iso.port))
    body = json.dumps({"input": "Fill the pipe.", "response_format": "pcm",
                       "max_audio_length_ms": 30000}).encode()
    s.sendall(
        (
            f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )
    time.sleep(0.5)
    assert httpx.get(f"{iso.url}/health").json()["active_streams"] == 1
    wait_idle(iso, timeout=40)  # far less than the minute of audio it asked for
    s.close()


# -- 8. secrets never reach the logs ---------------------------------------------------------------


def test_the_access_log_masks_tokens():
    import logging

    from csm_streaming.server.api import SecretFilter

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", f"/v1/stream?token={TOKEN}&x=1", "1.1", 401),
                               None)
    assert SecretFilter().filter(record)
    line = record.getMessage()
    assert TOKEN not in line and "token=***&x=1" in line


# -- 9. engine faults: fallback, lone out-of-memory, out-of-memory mid-chunk, two engines --------


def test_cpu_fallback_after_out_of_memory_does_not_deadlock(own_generator):
    from csm_streaming.engine.config import StreamingConfig
    from csm_streaming.engine.frontend import StreamingGenerator

    sg = StreamingGenerator(own_generator, StreamingConfig(max_batch_size=2))
    ref = own_generator.generate("Fall back.", 0, max_audio_length_ms=480, seed=3)
    calls = []
    sg._can_fall_back = lambda: True  # as on a GPU with allow_cpu_fallback
    sg.generator.fall_back_to_cpu = lambda: calls.append("moved")  # already on the CPU
    original = sg.engine._frame_step

    def oom_first(n, *rest):
        if not calls:
            raise torch.OutOfMemoryError("simulated")
        return original(n, *rest)

    sg.engine._frame_step = oom_first
    out = {}
    t = threading.Thread(target=lambda: out.update(audio=torch.cat(list(
        sg.generate_streaming("Fall back.", 0, max_audio_length_ms=480, seed=3)))), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the fallback deadlocked"
    assert calls == ["moved"] and sg.engine is not None
    torch.testing.assert_close(out["audio"], ref, atol=1e-4, rtol=0)


def test_a_lone_stream_out_of_memory_is_refused_not_retried_forever():
    live = LiveServer(max_streams=2)
    try:
        def always_oom(n, *rest):
            raise torch.OutOfMemoryError("simulated")

        live.engine_thread.engine._frame_step = always_oom
        r = httpx.post(f"{live.url}/api/generate", headers=AUTH, timeout=60,
                       json={"text": "Too big.", "max_audio_length_ms": 800})
        assert r.status_code == 503 and "out of device memory" in r.json()["error"]["message"]
        assert "Retry-After" in r.headers
    finally:
        live.close()


def test_out_of_memory_mid_chunk_loses_and_repeats_no_audio(tiny_generator):
    """Four streams; the device runs out of memory at the third frame of a chunk that all four
    are in. The two kept streams go on from exactly where they were: their audio equals their
    solo runs."""
    live = LiveServer(max_streams=4)
    engine = live.engine_thread.engine
    original_step, original_checkpoint = engine._frame_step, engine.state.checkpoint
    chunk = {"frame": 0, "raised": False}

    def checkpoint():  # called once at the start of every chunk
        chunk["frame"] = 0
        return original_checkpoint()

    def oom_mid_chunk(n, *rest):
        everyone = sum(s.state == "running" for s in engine.active) == 4
        if everyone and chunk["frame"] == 2 and not chunk["raised"]:
            chunk["raised"] = True  # the third frame of a chunk of all four streams
            raise torch.OutOfMemoryError("simulated")
        chunk["frame"] += 1
        return original_step(n, *rest)

    engine.state.checkpoint = checkpoint
    engine._frame_step = oom_mid_chunk
    bodies = [{"text": f"Stream {i} goes on.", "seed": 10 + i, "max_audio_length_ms": 6000,
               "top_k": 5} for i in range(4)]
    try:
        def post(body):
            return httpx.post(f"{live.url}/api/generate", headers=AUTH, timeout=120, json=body)

        with ThreadPoolExecutor(4) as pool:
            futures = []
            for b in bodies:  # admitted in this order: the first two are the older ones
                futures.append(pool.submit(post, b))
                time.sleep(0.15)
            responses = [f.result() for f in futures]
    finally:
        live.close()
    assert chunk["raised"]
    assert sorted(r.status_code for r in responses) == [200, 200, 503, 503]
    for body, r in zip(bodies, responses):
        if r.status_code != 200:
            continue
        audio, _ = sf.read(io.BytesIO(base64.b64decode(r.json()["audio_data"])), dtype="float32")
        solo = tiny_generator.generate(body["text"], 0, max_audio_length_ms=6000, seed=body["seed"],
                                       topk=5)
        torch.testing.assert_close(
            torch.from_numpy(audio), quantized(solo), atol=1.5 / 32767, rtol=0
        )


def test_a_newcomer_cuts_the_running_chunk_and_joins_the_next_one(tiny_generator):
    """A request that comes while a chunk is being made waits for one frame of the others, not
    the whole chunk (once the chunk holds a first chunk's frames), and its prompt is prefilled
    before the next chunk, which it joins: its first audio is one step away. Shown by the
    engine's frames and events, not by timing. Nobody's audio changes."""
    from csm_streaming.engine.config import StreamingConfig
    from csm_streaming.engine.frontend import StreamingGenerator

    sg = StreamingGenerator(tiny_generator, StreamingConfig(max_batch_size=2, chunk_size_ms=640,
                                                            first_chunk_ms=160))
    engine = sg.engine
    frame_step, frames, arrive_at = engine._frame_step, [0], [None]

    def counted(n, *rest):  # the engine thread's wake() when a request is queued, at a chosen frame
        frames[0] += 1
        if frames[0] == arrive_at[0]:
            engine.wake()
        return frame_step(n, *rest)

    engine._frame_step = counted
    engine._steps.clear()
    args = {"max_audio_length_ms": 2000, "temperature": 0.9, "top_k": 50}
    talker = engine.submit(GenerationRequest.of("I keep talking for a while.", 0, seed=1,
                                                **args))
    audio = {"talker": []}
    names = {talker.id: "talker"}

    def step():
        events = engine.step()
        for e in events:
            audio[names[e.stream.id]].append(e.audio)
        return {names[e.stream.id]: e.audio.numel() // 1920 for e in events}

    assert step() == {"talker": 2}  # prefill, then its first chunk (2 frames)
    assert step() == {"talker": 8}  # a whole chunk when nobody comes
    arrive_at[0] = frames[0] + 3
    assert step() == {"talker": 3}  # cut at the third frame: somebody came
    # the engine thread admits
    newcomer = engine.submit(GenerationRequest.of("Me too.", 1, seed=2, **args))
    names[newcomer.id], audio["newcomer"] = "newcomer", []
    assert step() == {"talker": 2, "newcomer": 2}  # prefilled first, then in the next chunk
    while engine.active:
        step()
    for s, text, speaker, seed in (("talker", "I keep talking for a while.", 0, 1),
                                   ("newcomer", "Me too.", 1, 2)):
        ref = tiny_generator.speak(GenerationRequest.of(text, speaker, seed=seed, **args))
        torch.testing.assert_close(torch.cat(audio[s]), ref, atol=1e-4, rtol=0)


def test_two_engines_on_one_model_keep_their_own_caches(tiny_generator):
    from csm_streaming.engine.config import StreamingConfig
    from csm_streaming.engine.frontend import StreamingGenerator

    wide = StreamingGenerator(tiny_generator, StreamingConfig(max_batch_size=3))
    it = wide.generate_streaming("The first engine speaks.", 0, max_audio_length_ms=1600, seed=8)
    first = [next(it)]
    narrow = StreamingGenerator(tiny_generator, StreamingConfig(max_batch_size=1, max_seq_len=128))
    list(
        narrow.generate_streaming("Another engine in between.", 1, max_audio_length_ms=800, seed=1)
    )
    assert wide.engine.caches.batch == 3 and wide.engine.caches.max_seq == 512
    out = torch.cat(first + list(it))
    ref = tiny_generator.generate("The first engine speaks.", 0, max_audio_length_ms=1600, seed=8)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_the_engine_thread_follows_a_replaced_engine(tiny_generator):
    from csm_streaming.engine.config import StreamingConfig
    from csm_streaming.engine.frontend import StreamingGenerator
    from csm_streaming.engine.scheduler import StreamEngine
    from csm_streaming.server.engine_thread import EngineThread

    sg = StreamingGenerator(tiny_generator, StreamingConfig(max_batch_size=2))
    sched = EngineThread(sg)
    sg.engine = StreamEngine(tiny_generator, sg.config)  # what a CPU fallback does
    assert sched.engine is sg.engine and sched.slots == 2


def test_streams_far_ahead_lend_their_lead_to_newcomers_prompts(tiny_generator):
    """Prompt work without audio to encode may take, beyond the chunk's slack, what every
    running stream has sent beyond what has played, less the next chunk's time (capped); a
    stream with no audio yet or one behind lends nothing."""
    from csm_streaming.engine.config import StreamingConfig
    from csm_streaming.engine.frontend import StreamingGenerator
    from csm_streaming.engine.scheduler import MAX_PROMPT_BUDGET_S

    engine = StreamingGenerator(tiny_generator, StreamingConfig(max_batch_size=2)).engine
    a, b = (engine.submit(GenerationRequest.of(t, 0, (), max_audio_length_ms=4000, seed=i))
            for i, t in enumerate(("Ahead.", "Also ahead.")))
    engine.prepare_all()
    assert a.state == b.state == "running"
    engine.chunk_s = 0.1
    assert engine.lendable_lead_s() == 0.0  # no audio yet
    now = time.perf_counter()
    for s, audio_s in ((a, 3.0), (b, 1.6)):  # first audio 1 s ago: 2.0 s and 0.6 s ahead
        s.metrics.started, s.metrics.first_audio_s, s.metrics.audio_s = now - 1.2, 0.2, audio_s
    lead = engine.lendable_lead_s()
    played = time.perf_counter() - now  # playback went on meanwhile: the lead shrank as much
    assert 0.6 - 0.1 - played <= lead <= 0.6 - 0.1  # the least lead, less the next chunk
    b.metrics.audio_s = 5.0
    assert engine.lendable_lead_s() == MAX_PROMPT_BUDGET_S  # both far ahead: the cap
    a.metrics.audio_s = 0.9  # behind real time: nothing to lend
    assert engine.lendable_lead_s() == 0.0
    for s in (a, b):
        engine.cancel(s)


def test_lent_time_goes_to_prompts_without_audio_to_encode_only(tiny_generator):
    """With a budget of nothing and lent time, every light prompt is prefilled in one run; a
    request with context audio to encode does one unit and waits for the next chunk."""
    from csm_streaming.engine.config import StreamingConfig
    from csm_streaming.engine.frontend import StreamingGenerator

    engine = StreamingGenerator(tiny_generator, StreamingConfig(max_batch_size=4)).engine
    light = [engine.submit(GenerationRequest.of(f"Newcomer {i} is here.", 0, (),
                                                max_audio_length_ms=800, seed=i))
             for i in range(3)]
    heavy = engine.submit(GenerationRequest.of(
        "With context.", 0, (Segment(1, "Earlier.", speech_like(3.0)),), max_audio_length_ms=800,
        seed=9))
    assert engine.prompts.run(0.0, lent_s=30.0) == []
    assert [s.state for s in light] == ["running"] * 3 and heavy.state == "preparing"
    assert engine.prompts.pending  # the heavy job: one unit of it at most
    for s in (*light, heavy):
        engine.cancel(s)
