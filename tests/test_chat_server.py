"""Named voices, chat over HTTP and WebSocket, the command line's --chat, the Cerebrium entry.

The LLM is a local stub speaking OpenAI's streaming wire format (tests/llm_stubs.py); the voice
clip is made here (no recordings ship with the project)."""

import base64
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import AUTH, TOKEN, LiveServer, speech_like
from csm_streaming.audio import to_mono_24k
from csm_streaming.engine.config import StreamingConfig
from csm_streaming.engine.frontend import StreamingGenerator
from csm_streaming.engine.voices import VoiceError, VoiceLibrary
from csm_streaming.request import Segment
from llm_stubs import LLMStub

ROOT = Path(__file__).resolve().parent.parent
# as the stub's tokens arrive: the first piece at the first clause end, then a whole sentence
PIECES = ["Hello there,", "friend. It is a fine day to be talking with you, I think."]


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("voices")
    clip = np.stack([speech_like(0.8, seed=9).numpy()] * 2, axis=1)  # stereo, 44.1 kHz
    sf.write(folder / "anna.wav", clip, 44_100)
    (folder / "anna.txt").write_text("This is how I sound.\n")
    (folder / "anna.json").write_text('{"speaker": 2}')
    return folder


@pytest.fixture(scope="module")
def stub():
    s = LLMStub("openai", ["Hello", " there,", " friend.", " It is", " a fine day", " to be",
                           " talking with", " you, I", " think."], delay=0.15)
    yield s
    s.close()


@pytest.fixture(scope="module")
def live(voices_dir, stub, mimi):
    from csm_streaming.engine.reference import Generator
    from csm_streaming.model.checkpoints import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer("random:tiny", torch.device("cpu"))
    voices = VoiceLibrary.load(voices_dir, Generator(model, tok, mimi))
    s = LiveServer(max_streams=4, voices=voices, chat=stub.config())
    yield s
    s.close()


def quantized(audio):
    return torch.from_numpy(np.clip(audio.numpy(), -1, 1) * 32767).round() / 32767


def pcm(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767)


# -- voices ---------------------------------------------------------------------------------------


def test_a_voice_is_read_and_encoded_once(voices_dir, tiny_generator):
    lib = VoiceLibrary.load(voices_dir, tiny_generator)
    anna = lib.get("anna")
    assert lib.names() == ["anna"] and anna.speaker == 2 and anna.text == "This is how I sound."
    data, rate = sf.read(voices_dir / "anna.wav", dtype="float32", always_2d=True)
    expected = tiny_generator.encode_audio(to_mono_24k(data.T, rate))
    assert anna.segment.codes is not None and torch.equal(anna.segment.codes, expected)
    with pytest.raises(VoiceError, match="no voice named 'bob'.*anna"):
        lib.get("bob")


def test_the_speech_route_speaks_in_a_named_voice_without_encoding_it_again(live, voices_dir,
                                                                              tiny_generator,
                                                                              monkeypatch):
    from csm_streaming.engine import prompt_prefill as prompts
    calls = []
    original = prompts.encode_slices
    monkeypatch.setattr(prompts, "encode_slices", lambda *a: calls.append(1) or original(*a))
    listed = httpx.get(f"{live.url}/v1/voices", headers=AUTH).json()["data"]
    assert [v["id"] for v in listed if v["type"] == "named"] == ["anna"]
    assert "voices" not in httpx.get(f"{live.url}/health").json()  # liveness only
    r = httpx.post(f"{live.url}/v1/audio/speech", headers=AUTH, timeout=120,
                   json={"input": "In my own voice.", "voice": "anna", "response_format": "pcm",
                         "max_audio_length_ms": 800, "seed": 5, "top_k": 1})
    assert r.status_code == 200 and calls == []  # the clip's codes were ready
    anna = VoiceLibrary.load(voices_dir, tiny_generator).get("anna")
    solo = tiny_generator.generate("In my own voice.", 2, [anna.segment], 800, topk=1, seed=5)
    torch.testing.assert_close(pcm(r.content), quantized(solo), atol=1.5 / 32767, rtol=0)
    bad = httpx.post(f"{live.url}/v1/audio/speech", headers=AUTH,
                     json={"input": "x", "voice": "bob"})
    assert bad.status_code == 400 and "anna" in bad.json()["error"]["message"]


# -- chat -----------------------------------------------------------------------------------------


def direct(tiny_generator, pieces, speaker, context, seed, max_ms):
    sg = StreamingGenerator(tiny_generator, StreamingConfig())
    audio = torch.cat(list(sg.generate_streaming(pieces, speaker, context, max_ms, seed=seed)))
    return audio, sg.engine.last_stream.all_codes


def test_chat_speech_streams_text_and_audio_before_the_llm_is_done(live, stub, tiny_generator):
    import time

    events, first_audio = [], None
    with httpx.stream("POST", f"{live.url}/v1/chat/speech", headers=AUTH, timeout=120, json={
            "messages": [{"role": "user", "content": "How are you?"}], "voice": "anna",
            "stream_format": "sse", "seed": 4, "max_audio_length_ms": 3200}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["type"] == "speech.audio.delta" and first_audio is None:
                    first_audio = time.perf_counter()
    assert first_audio < stub.sent_last_at  # spoken while the LLM was still writing
    text = "".join(e["delta"] for e in events if e["type"] == "text.delta")
    assert text == " ".join(PIECES) and events[-1]["type"] == "speech.audio.done"
    assert events[-1]["text"] == text and 0 < events[-1]["llm_wait_share"] <= 1
    first_text = next(i for i, e in enumerate(events) if e["type"] == "text.delta")
    assert first_text < next(i for i, e in enumerate(events) if e["type"] == "speech.audio.delta")
    audio = torch.cat([pcm(base64.b64decode(e["audio"])) for e in events
                       if e["type"] == "speech.audio.delta"])
    ref, _ = direct(tiny_generator, PIECES, 2, [_anna(live)], 4, 3200)
    torch.testing.assert_close(audio, quantized(ref), atol=1.5 / 32767, rtol=0)
    metrics = httpx.get(f"{live.url}/metrics", headers=AUTH).text
    assert "csm_chat_llm_wait_seconds_count" in metrics


def test_speech_cut_at_its_cap_still_ends_with_the_whole_reply_text(live, stub):
    # 160 ms of speech ends long before the LLM has written its last words (0.15 s apart):
    # the done event and the text deltas still carry the whole reply, never a part
    with httpx.stream("POST", f"{live.url}/v1/chat/speech", headers=AUTH, timeout=120, json={
            "messages": [{"role": "user", "content": "Short?"}], "stream_format": "sse",
            "seed": 1, "max_audio_length_ms": 160}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    text = "".join(e["delta"] for e in events if e["type"] == "text.delta")
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["audio_ms"] == 160
    assert text == events[-1]["text"] == " ".join(PIECES)


def _anna(live) -> Segment:
    return live.app.state.ctx.voices.get("anna").segment


def test_a_websocket_chat_keeps_each_reply_in_the_context(live, stub, tiny_generator):
    from websockets.sync.client import connect

    def turn(ws, message):
        ws.send(json.dumps(message))
        audio, text = b"", ""
        while True:
            m = ws.recv(timeout=120)
            if isinstance(m, bytes):
                audio += m
                continue
            m = json.loads(m)
            if m["type"] == "text":
                assert not audio or text  # text comes ahead of its audio
                text += m["delta"]
            elif m["type"] in ("done", "error"):
                return pcm(audio), text, m

    with connect(f"ws://127.0.0.1:{live.port}/v1/stream", additional_headers=AUTH) as ws:
        a1, t1, end1 = turn(ws, {"type": "chat", "text": "First?", "voice": "anna", "seed": 1,
                                 "max_audio_length_ms": 2400})
        a2, t2, end2 = turn(ws, {"type": "chat", "text": "Second?", "seed": 2,
                                 "max_audio_length_ms": 2400})
    assert end1["type"] == end2["type"] == "done" and t1 == t2 == " ".join(PIECES)
    ref1, codes1 = direct(tiny_generator, PIECES, 2, [_anna(live)], 1, 2400)
    torch.testing.assert_close(a1, quantized(ref1), atol=1.5 / 32767, rtol=0)
    spoken = " ".join(PIECES)
    context = [_anna(live), Segment(3, "First?"), Segment(2, spoken, codes=codes1)]
    ref2, _ = direct(tiny_generator, PIECES, 2, context, 2, 2400)
    torch.testing.assert_close(a2, quantized(ref2), atol=1.5 / 32767, rtol=0)  # turn 1 was heard
    sent = stub.requests[-1]["body"]["messages"]
    user_turns = [m["content"] for m in sent if m["role"] == "user"]
    assert user_turns == ["First?", "Second?"]


def receive_until(ws, *types) -> dict:
    """Messages of a socket until a JSON one of these types (audio bytes are skipped)."""
    while True:
        m = ws.recv(timeout=60)
        if not isinstance(m, bytes) and json.loads(m)["type"] in types:
            return json.loads(m)


def test_chat_failures_are_clear_and_a_session_goes_on(live, stub):
    from websockets.sync.client import connect

    stub.fail = 500
    try:
        with httpx.stream("POST", f"{live.url}/v1/chat/speech", headers=AUTH, timeout=60, json={
                "messages": [{"role": "user", "content": "Hi?"}], "stream_format": "sse"}) as r:
            body = "".join(r.iter_lines())
        assert r.status_code == 502 and "failed the request (500)" in body  # upstream's fault
        with connect(f"ws://127.0.0.1:{live.port}/v1/stream", additional_headers=AUTH) as ws:
            ws.send(json.dumps({"type": "chat", "text": "Hi?", "max_audio_length_ms": 800}))
            err = receive_until(ws, "error", "done")
            assert err["type"] == "error" and "failed the request (500)" in err["message"]
            assert err["status"] == 502
            stub.fail = None
            ws.send(json.dumps({"text": "Again?", "max_audio_length_ms": 800}))
            assert receive_until(ws, "error", "done")["type"] == "done"  # the same socket goes on
    finally:
        stub.fail = None


@pytest.mark.parametrize("fail, status", [(401, 502), ("hang", 504)])
def test_llm_failures_are_upstream_statuses_never_500(live, stub, fail, status):
    from dataclasses import replace

    ctx = live.app.state.ctx
    chat, stub.fail = ctx.chat, fail
    ctx.chat = replace(chat, timeout_s=1.0)
    try:
        r = httpx.post(f"{live.url}/v1/chat/speech", headers=AUTH, timeout=60, json={
            "messages": [{"role": "user", "content": "Hi?"}], "response_format": "pcm"})
    finally:
        ctx.chat, stub.fail = chat, None
    assert r.status_code == status, r.text
    down = replace(chat, base_url="http://127.0.0.1:9/v1")
    ctx.chat = down
    try:
        r = httpx.post(f"{live.url}/v1/chat/speech", headers=AUTH, timeout=60, json={
            "messages": [{"role": "user", "content": "Hi?"}], "response_format": "pcm"})
    finally:
        ctx.chat = chat
    assert r.status_code == 503 and "Retry-After" in r.headers
    assert "cannot reach" in r.json()["error"]["message"]


def test_the_server_checks_the_llm_before_loading_the_model(stub, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENAI_BASE_URL": stub.base_url,
           "OPENAI_API_KEY": "wrong", "OPENAI_MODEL": "stub-model"}
    stub.fail = 401
    try:
        r = subprocess.run([sys.executable, "-m", "csm_streaming.server.app", "--model",
                            "random:tiny", "--llm", "openai"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=120)
    finally:
        stub.fail = None
    assert r.returncode == 2 and "refused the API key (401): check OPENAI_API_KEY" in r.stderr
    assert "warm-up" not in r.stderr and "Uvicorn running" not in r.stderr


def test_without_an_llm_chat_says_how_to_turn_it_on():
    s = LiveServer(max_streams=1)
    try:
        r = httpx.post(f"{s.url}/v1/chat/speech", headers=AUTH,
                       json={"messages": [{"role": "user", "content": "Hi?"}]})
    finally:
        s.close()
    assert r.status_code == 404 and "--llm" in r.json()["error"]["message"]


# -- the command line and Cerebrium -----------------------------------------------------------


def test_the_command_line_chats_here_and_with_a_server(stub, live, voices_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENAI_BASE_URL": stub.base_url,
           "OPENAI_API_KEY": "k", "OPENAI_MODEL": "stub-model"}
    env.pop("GOOGLE_API_KEY", None)
    out = tmp_path / "chat.wav"
    local = subprocess.Popen(
        [sys.executable, str(ROOT / "test_streaming.py"), "--chat", "--model", "random:tiny",
         "--voice", "anna", "--voices-dir", str(voices_dir), "--no-dashboard", "--seed", "1",
         "--max-audio-ms", "800", "--output", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, cwd=ROOT)
    local.stdin.write("How are you?\n")
    local.stdin.flush()
    deadline = time.monotonic() + 240
    while not out.exists() and local.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the first reply is on disk (written whole) before the next message
    assert out.exists() and sf.info(out).frames == 10 * 1920, local.poll()
    stdout, stderr = local.communicate("And now?\n", timeout=300)
    local = subprocess.CompletedProcess(local.args, local.returncode, stdout, stderr)
    assert local.returncode == 0, local.stderr
    # stdout is the transcript: each piece of each reply as it came (the dashboard is on stderr)
    assert local.stdout.splitlines() == [f"csm> {p}" for p in PIECES] * 2
    assert "llm_first_words=" in local.stderr and "talking with openai stub-model" in local.stderr
    assert sf.info(out).frames == 2 * 10 * 1920  # two replies of 800 ms
    remote = subprocess.run(
        [sys.executable, str(ROOT / "test_streaming.py"), "--chat", "--server", live.url,
         "--token", TOKEN, "--voice", "anna", "--no-dashboard", "--max-audio-ms", "800"],
        input="Hello?\n", capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout.splitlines() == [f"csm> {p}" for p in PIECES]
    none = subprocess.run([sys.executable, str(ROOT / "test_streaming.py"), "--chat"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, input="",
                          env={k: v for k, v in env.items() if not k.startswith("OPENAI")})
    assert none.returncode == 2 and "no language model is configured" in none.stderr


def test_the_cerebrium_entry_answers_base64_wav(monkeypatch, tiny_generator):
    spec = importlib.util.spec_from_file_location("cerebrium_main", ROOT / "cerebrium" / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    monkeypatch.setenv("CSM_MODEL", "random:tiny")
    out = main.generate("Hello from Cerebrium.", speaker_id=1, max_audio_length_ms=800, seed=3)
    assert out["format"] == "wav" and out["encoding"] == "base64" and out["duration_ms"] == 800
    audio, sr = sf.read(io.BytesIO(base64.b64decode(out["audio_data"])), dtype="float32")
    assert sr == 24_000 and audio.shape == (10 * 1920,) and out["attempts"] == 1
    assert main.generate("")["status_code"] == 400
    bad = main.generate("Hi.", context=[{"speaker": 0, "text": "a", "audio_base64": "@@"}])
    assert bad["status_code"] == 400 and "base64" in bad["error"]

    from csm_streaming.request import EmptyOutputError

    calls = []

    def empty_then_audio(*args):  # empty at first: the next attempt has a new seed
        calls.append(args)
        if len(calls) == 1:
            raise EmptyOutputError(3)
        return torch.zeros(1920)

    monkeypatch.setattr(main.generator(), "generate", empty_then_audio)
    again = main.generate("Retry me.", seed=7)
    assert again["attempts"] == 2 and calls[1][-1] == 8
    monkeypatch.setattr(main.generator(), "generate",
                        lambda *a: (_ for _ in ()).throw(EmptyOutputError(3)))
    assert main.generate("Never.")["status_code"] == 422


def test_the_cerebrium_stream_yields_audio_events_in_a_voice(monkeypatch, voices_dir):
    spec = importlib.util.spec_from_file_location("cerebrium_main2", ROOT / "cerebrium" / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    monkeypatch.setenv("CSM_MODEL", "random:tiny")
    monkeypatch.setenv("CSM_VOICES_DIR", str(voices_dir))
    events = [json.loads(e) for e in main.stream("Streamed.", voice="anna",
                                                 max_audio_length_ms=800, seed=3, top_k=1)]
    audio = [e for e in events if e["type"] == "audio"]
    assert len(audio) >= 2 and events[-1]["type"] == "done"  # chunk by chunk, then done
    assert events[-1]["duration_ms"] == 800 and events[-1]["load_ms"] > 0
    got = pcm(b"".join(base64.b64decode(e["audio"]) for e in audio))
    # the same request in one piece (the plain loop, the voice's clip as context): as long;
    # not the same samples, since a stream is watermarked in windows, a whole answer at once
    one = main.generate("Streamed.", voice="anna", max_audio_length_ms=800, seed=3, top_k=1)
    assert one["load_ms"] < events[-1]["load_ms"] and one["run_time_ms"] > 0  # loaded once
    ref, _ = sf.read(io.BytesIO(base64.b64decode(one["audio_data"])), dtype="float32")
    assert got.shape == ref.shape == (10 * 1920,) and got.abs().max() > 0.001
    bad = [json.loads(e) for e in main.stream("Hi.", voice="nobody")]
    assert bad == [{"type": "error", "error": bad[0]["error"], "status_code": 400}]
    assert "anna" in bad[0]["error"]
