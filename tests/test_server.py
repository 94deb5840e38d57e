"""The server over real HTTP on 127.0.0.1 (uvicorn in a thread), with the tiny random model."""

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import AUTH, TOKEN, LiveServer, speech_like
from csm_streaming.engine.reference import Generator
from csm_streaming.model.checkpoints import load_mimi, load_model_and_tokenizer
from csm_streaming.request import Segment


@pytest.fixture(scope="module")
def live():
    s = LiveServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference():
    """The plain Generator on the same (deterministic) tiny random model."""
    model, tok, _ = load_model_and_tokenizer("random:tiny", torch.device("cpu"))
    return Generator(model, tok, load_mimi("random", "cpu"))


def read_wav_b64(b64):
    audio, sr = sf.read(io.BytesIO(base64.b64decode(b64)), dtype="float32")
    return torch.from_numpy(audio), sr


def quantized(audio):
    return torch.from_numpy(np.clip(audio.numpy(), -1, 1) * 32767).round() / 32767


def test_health_needs_no_token(live):
    r = httpx.get(f"{live.url}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["slots"] == 16


def test_16_concurrent_clients_each_get_their_solo_audio(live, reference):
    reqs = [
        {
            "text": f"Client number {i} speaks now.",
            "speaker_id": i % 3,
            "top_k": 1 if i % 2 else 40,
            "temperature": 0.7 + 0.05 * (i % 4),
            "max_audio_length_ms": 480 + 80 * (i % 5),
            "seed": 100 + i,
        }
        for i in range(16)
    ]

    def call(body):
        return httpx.post(f"{live.url}/api/generate", json=body, headers=AUTH, timeout=300)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(call, reqs))
    for body, r in zip(reqs, responses):
        assert r.status_code == 200, r.text
        got = r.json()
        assert (
            got["format"] == "wav" and got["encoding"] == "base64" and got["sample_rate"] == 24000
        )
        audio, sr = read_wav_b64(got["audio_data"])
        solo = reference.generate(
            body["text"],
            body["speaker_id"],
            max_audio_length_ms=body["max_audio_length_ms"],
            temperature=body["temperature"],
            topk=body["top_k"],
            seed=body["seed"],
        )
        assert audio.shape == solo.shape
        torch.testing.assert_close(audio, quantized(solo), atol=1.5 / 32767, rtol=0)
        assert got["duration_ms"] == pytest.approx(body["max_audio_length_ms"])
    metrics = httpx.get(f"{live.url}/metrics", headers=AUTH).text
    assert 'csm_requests_total{route="/api/generate",status="200"}' in metrics
    assert "csm_rtf_count" in metrics and "csm_time_to_first_audio_seconds_bucket" in metrics


def test_context_over_http(live, reference):
    ctx_audio = speech_like(0.5)
    buf = io.BytesIO()
    stereo = np.stack([ctx_audio.numpy(), ctx_audio.numpy()], axis=1)
    sf.write(buf, stereo, 24000, format="WAV", subtype="FLOAT")
    body = {
        "text": "Answer.",
        "speaker_id": 0,
        "top_k": 1,
        "max_audio_length_ms": 400,
        "seed": 1,
        "context": [
            {
                "speaker": 1,
                "text": "Question?",
                "audio_base64": base64.b64encode(buf.getvalue()).decode(),
            }
        ],
    }
    r = httpx.post(f"{live.url}/api/generate", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    solo = reference.generate(
        "Answer.",
        0,
        [Segment(1, "Question?", torch.from_numpy(stereo.T.copy()), 24000)],
        max_audio_length_ms=400,
        topk=1,
        seed=1,
    )
    audio, _ = read_wav_b64(r.json()["audio_data"])
    torch.testing.assert_close(audio, quantized(solo), atol=1.5 / 32767, rtol=0)


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"speaker_id": 0}, 400, "text"),
        ({"text": "   "}, 400, "text must be a non-empty string"),
        ({"text": "x" * 5000}, 413, "limit is 2000"),
        ({"text": "hi", "speaker_id": "abc"}, 400, "speaker_id"),
        ({"text": "hi", "temperature": "hot"}, 400, "temperature"),
        ({"text": "hi", "temperature": -1}, 400, "temperature"),
        ({"text": "hi", "top_k": 0}, 400, "top_k"),
        ({"text": "hi", "speaker_id": -4}, 400, "speaker_id"),
        (
            {
                "text": "hi",
                "context": [{"speaker": 0, "text": "a", "audio_base64": "@@not base64@@"}],
            },
            400,
            "base64",
        ),
        (
            {
                "text": "hi",
                "context": [
                    {
                        "speaker": 0,
                        "text": "a",
                        "audio_base64": base64.b64encode(b"not audio").decode(),
                    }
                ],
            },
            400,
            "not a readable audio file",
        ),
        ({"text": "hi", "unknown_field": 1}, 400, "unknown_field"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(live, body, status, words):
    r = httpx.post(f"{live.url}/api/generate", json=body, headers=AUTH, timeout=60)
    assert r.status_code == status, r.text
    msg = r.json()["error"]["message"]
    assert words in msg and "Traceback" not in r.text
    ok = httpx.post(
        f"{live.url}/api/generate",
        json={"text": "Still here.", "max_audio_length_ms": 160},
        headers=AUTH,
        timeout=60,
    )
    assert ok.status_code == 200


def test_tokens_and_body_size(live):
    r = httpx.post(f"{live.url}/api/generate", json={"text": "hi"})
    assert r.status_code == 401 and "bearer token" in r.json()["error"]["message"]
    r = httpx.post(
        f"{live.url}/api/generate", json={"text": "hi"}, headers={"Authorization": "Bearer wrong"}
    )
    assert r.status_code == 401
    assert httpx.get(f"{live.url}/metrics").status_code == 401
    big = {
        "text": "hi",
        "context": [{"speaker": 0, "text": "a", "audio_base64": "A" * (3 * 2**20)}],
    }
    r = httpx.post(f"{live.url}/api/generate", json=big, headers=AUTH, timeout=60)
    assert r.status_code == 413 and "request body over" in r.json()["error"]["message"]


def test_openai_speech_route_with_the_official_client(live, reference):
    from openai import OpenAI

    client = OpenAI(base_url=f"{live.url}/v1", api_key=TOKEN)
    resp = client.audio.speech.create(
        model="csm-1b",
        voice="1",
        input="Hello from the OpenAI client.",
        response_format="wav",
        extra_body={"seed": 3, "top_k": 1, "max_audio_length_ms": 640},
    )
    data = resp.read()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    pcm = np.frombuffer(data[44:], dtype="<i2").astype(np.float32) / 32767
    solo = reference.generate(
        "Hello from the OpenAI client.", 1, max_audio_length_ms=640, topk=1, seed=3
    )
    assert pcm.shape[0] == solo.shape[0]
    torch.testing.assert_close(torch.from_numpy(pcm), quantized(solo), atol=1.5 / 32767, rtol=0)
    # raw PCM, streamed
    with client.audio.speech.with_streaming_response.create(
            model="csm-1b", voice="alloy", input="Streaming raw.", response_format="pcm",
            extra_body={"max_audio_length_ms": 480}) as r:
        body = b"".join(r.iter_bytes())
    assert len(body) == 6 * 1920 * 2


def test_speech_route_errors(live):
    def post(**body):
        return httpx.post(
            f"{live.url}/v1/audio/speech",
            json={"model": "csm-1b", "input": "hi", **body},
            headers=AUTH,
            timeout=60,
        )

    r = post(voice="darth")
    assert r.status_code == 400 and "unknown voice" in r.json()["error"]["message"]
    r = post(response_format="mp4")
    assert r.status_code == 400 and "mp3, opus, aac, flac, wav, pcm" in r.json()["error"]["message"]
    r = post(input="")
    assert r.status_code == 400


def sse_audio(live, **extra) -> bytes:
    with httpx.stream("POST", f"{live.url}/v1/audio/speech", headers=AUTH, timeout=60,
                      json={"input": "Events please.", "voice": "0", "stream_format": "sse",
                            "max_audio_length_ms": 480, **extra}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert deltas and events[-1]["type"] == "speech.audio.done"
    return b"".join(base64.b64decode(e["audio"]) for e in deltas)


def test_sse_deltas_carry_the_response_format(live):
    """As OpenAI's: LiveKit's OpenAI plugin (gpt-4o-mini-tts asks for SSE) decodes the deltas
    as the response_format, mp3 by default."""
    assert len(sse_audio(live, response_format="pcm")) == 6 * 1920 * 2
    audio, rate = sf.read(io.BytesIO(sse_audio(live)), dtype="float32")  # mp3, the default
    assert rate == 24000 and abs(len(audio) - 6 * 1920) < 1920


def test_websocket_stream_and_cancel_on_close(live):
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{live.port}/v1/stream", additional_headers=AUTH) as ws:
        ws.send(
            json.dumps(
                {"text": "Socket speech.", "speaker": 0, "max_audio_length_ms": 640, "seed": 2}
            )
        )
        pcm, msgs = b"", []
        while True:
            m = ws.recv(timeout=60)
            if isinstance(m, bytes):
                pcm += m
            else:
                msgs.append(json.loads(m))
                if msgs[-1]["type"] in ("done", "error"):
                    break
    assert msgs[-1]["type"] == "done" and len(pcm) == 8 * 1920 * 2
    assert any(m["type"] == "progress" for m in msgs)
    # a bad request gets a JSON error
    with connect(f"ws://127.0.0.1:{live.port}/v1/stream", additional_headers=AUTH) as ws:
        ws.send(json.dumps({"text": ""}))
        err = json.loads(ws.recv(timeout=30))
    assert err["type"] == "error" and err["status"] == 400
    # closing mid-stream frees the slot
    ws = connect(f"ws://127.0.0.1:{live.port}/v1/stream", additional_headers=AUTH)
    ws.send(json.dumps({"text": "A long one that will be cut.", "max_audio_length_ms": 30000}))
    while not isinstance(ws.recv(timeout=60), bytes):
        pass
    ws.close()
    wait_until_idle(live)


def wait_until_idle(live, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(f"{live.url}/health").json()
        if h["active_streams"] == 0 and h["queued"] == 0:
            return
        time.sleep(0.1)
    pytest.fail(f"slot not freed: {h}")


def test_client_disconnect_mid_stream_frees_the_slot(live):
    with httpx.stream("POST", f"{live.url}/v1/audio/speech", headers=AUTH, timeout=60,
                      json={"input": "This would go on for a minute.", "response_format": "pcm",
                            "max_audio_length_ms": 30000}) as r:
        first = next(r.iter_bytes())
        assert first
        assert httpx.get(f"{live.url}/health").json()["active_streams"] == 1
    # the response is closed here, mid-stream
    t = time.monotonic()
    wait_until_idle(live)
    assert time.monotonic() - t < 10
    assert "csm_cancelled_total" in httpx.get(f"{live.url}/metrics", headers=AUTH).text


def test_full_server_answers_503_with_retry_after():
    s = LiveServer(max_streams=1, max_queue=1)
    try:
        def long():
            return httpx.post(f"{s.url}/api/generate", headers=AUTH, timeout=120,
                              json={"text": "Long.", "max_audio_length_ms": 4000})

        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(long)
            time.sleep(1.0)  # the first holds the only slot
            second = pool.submit(long)  # waits in the queue
            time.sleep(0.5)
            third = httpx.post(
                f"{s.url}/api/generate", headers=AUTH, json={"text": "No room."}, timeout=30
            )
            assert third.status_code == 503 and "Retry-After" in third.headers
            assert "retry" in third.json()["error"]["message"]
            # nothing already accepted is lost
            assert first.result().status_code == 200 and second.result().status_code == 200
    finally:
        s.close()


def test_speech_without_a_length_fits_the_window(live):
    """No max_audio_length_ms: the longest that fits the model's window, not a 400."""
    with httpx.stream("POST", f"{live.url}/v1/audio/speech", headers=AUTH, timeout=60,
                      json={"input": "No length given.", "response_format": "pcm"}) as r:
        assert r.status_code == 200
        assert next(r.iter_bytes())  # it streams; closing here cancels it
    wait_until_idle(live)


def test_a_second_request_on_a_speaking_socket_is_told_and_the_first_goes_on(live):
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{live.port}/v1/stream", additional_headers=AUTH) as ws:
        ws.send(json.dumps({"text": "First.", "max_audio_length_ms": 1600, "seed": 1}))
        assert isinstance(ws.recv(timeout=60), bytes)  # it speaks
        ws.send(json.dumps({"text": "Second, at once."}))
        msgs, pcm = [], 0
        while not msgs or msgs[-1]["type"] != "done":
            m = ws.recv(timeout=60)
            if isinstance(m, bytes):
                pcm += len(m)
            else:
                msgs.append(json.loads(m))
    errors = [m for m in msgs if m["type"] == "error"]
    assert len(errors) == 1 and errors[0]["status"] == 409
    assert "one request per socket" in errors[0]["message"]
    assert msgs[-1]["audio_ms"] == 1600  # the first request was spoken whole
