"""Cartesia's TTS WebSocket against the real server (random:tiny), driven with the messages
pipecat's CartesiaTTSService and LiveKit's cartesia.TTS send: contexts whose text comes in
pieces, word timestamps, two contexts interleaved on one socket, cancel mid-stream, and bad
input answered per context."""

import base64
import json
import time

import httpx
import pytest
from websockets.sync.client import connect

from conftest import AUTH, TOKEN, LiveServer, letters_heard_between
from csm_streaming.server.api import ServerSettings
from csm_streaming.server.speech_contexts import word_times


@pytest.fixture(scope="module")
def live(mimi):
    # 8 s at most per request or context: random weights never end, the tests stay short
    server = LiveServer(max_streams=4,
                        settings=ServerSettings(token=TOKEN, max_audio_length_ms=8000))
    yield server
    server.close()


def url(live, query=f"api_key={TOKEN}&cartesia_version=2024-06-10"):
    return live.url.replace("http", "ws") + "/tts/websocket?" + query


def message(cid, transcript, cont=True, rate=16000, **extra):
    """As the clients build it: the options of the TTS object on every message."""
    return json.dumps({"model_id": "sonic-2", "voice": {"mode": "id", "id": "1"},
                       "output_format": {"container": "raw", "encoding": "pcm_s16le",
                                         "sample_rate": rate},
                       "language": "en", "context_id": cid, "transcript": transcript,
                       "continue": cont, "add_timestamps": True, **extra})


def receive_until(ws, done_for: set, timeout=60):
    """Messages until every context in done_for has its done (or an error)."""
    got, deadline = [], time.monotonic() + timeout
    while done_for:
        m = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        got.append(m)
        if m["type"] in ("done", "error"):
            done_for.discard(m.get("context_id"))
    return got


def test_text_in_pieces_is_spoken_with_word_timestamps(live):
    with connect(url(live)) as ws:
        for piece in ("Hello ", "there, ", "how are ", "you today? ", "I am fine."):
            ws.send(message("ctx-1", piece))
        ws.send(message("ctx-1", "", cont=False))
        got = receive_until(ws, {"ctx-1"})
    assert all(m["context_id"] == "ctx-1" for m in got) and got[-1]["type"] == "done"
    audio = b"".join(base64.b64decode(m["data"]) for m in got if m["type"] == "chunk")
    seconds = len(audio) / 2 / 16000  # s16le at the asked rate
    assert seconds > 0.5
    words, starts, ends = [], [], []
    for m in got:
        if m["type"] == "timestamps":
            t = m["word_timestamps"]
            words += t["words"]
            starts += t["start"]
            ends += t["end"]
    assert words == "Hello there, how are you today? I am fine.".split()  # once, in order
    assert all(s < e for s, e in zip(starts, ends))
    assert all(e1 <= s2 + 1e-9 for e1, s2 in zip(ends, starts[1:]))  # across phrases too
    assert starts[0] >= 0 and ends[-1] <= seconds + 1e-3
    metrics = httpx.get(f"{live.url}/metrics", headers=AUTH, timeout=10).text
    assert 'csm_requests_total{route="/tts/websocket",status="200"}' in metrics  # a context


def test_word_timestamps_are_where_the_servers_aligner_hears_the_words(live, monkeypatch):
    """With --word-aligner each phrase's words are where the recogniser hears their letters
    (here: from 0.2 to 1.2 s into each phrase), not the estimate (from the phrase's start)."""
    monkeypatch.setattr(live.app.state.ctx, "aligner", letters_heard_between(10, 60))
    with connect(url(live)) as ws:
        ws.send(message("heard", "Hi there. "))
        ws.send(message("heard", "See you soon.", cont=False))
        got = receive_until(ws, {"heard"})
    assert got[-1]["type"] == "done"
    stamps = [m["word_timestamps"] for m in got if m["type"] == "timestamps"]
    assert [w for t in stamps for w in t["words"]] == "Hi there. See you soon.".split()
    first = stamps[0]
    assert 0.2 - 1e-6 <= first["start"][0] and first["end"][-1] <= 1.2 + 1e-6
    ends = [e for t in stamps for e in t["end"]]
    starts = [s for t in stamps for s in t["start"]]
    assert all(s < e for s, e in zip(starts, ends))
    assert all(e1 <= s2 + 1e-9 for e1, s2 in zip(ends, starts[1:]))


def test_two_contexts_interleave_and_a_cancelled_one_stops_at_once(live):
    health = f"{live.url}/health"
    with connect(url(live)) as ws:
        ws.send(message("keep", "This one keeps talking. "))
        ws.send(message("stop", "This one is cut short. "))  # never ended: it would wait
        first_stop = None
        while first_stop is None:
            m = json.loads(ws.recv(timeout=60))
            if m["context_id"] == "stop" and m["type"] == "chunk":
                first_stop = m
        ws.send(json.dumps({"context_id": "stop", "cancel": True}))
        # the server reads messages in order: keep's flush_done comes after the cancel is done
        ws.send(message("keep", "", flush=True))
        after_cancel = []
        flushed = False
        ws.send(message("keep", "", cont=False))
        for m in receive_until(ws, {"keep"}):
            if m["type"] == "flush_done":
                flushed = True
            elif flushed:
                after_cancel.append(m)
    assert flushed and not [m for m in after_cancel if m["context_id"] == "stop"]
    assert after_cancel[-1] == {"type": "done", "context_id": "keep", "status_code": 206,
                                "done": True}
    deadline = time.monotonic() + 10  # the cancelled stream's slot is freed
    while httpx.get(health, timeout=5).json()["active_streams"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(health, timeout=5).json()["active_streams"] == 0


@pytest.mark.parametrize("bad, says", [
    ({"voice": {"mode": "id", "id": "no-such-voice"}}, "unknown voice"),
    ({"output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 96000}},
     "less than or equal to 48000"),
    ({"output_format": {"container": "mp3", "encoding": "mp3", "sample_rate": 24000}}, "raw"),
    ({"voice": {"mode": "embedding", "embedding": [0.1]}}, "embeddings"),
])
def test_a_bad_context_gets_its_error_and_the_socket_goes_on(live, bad, says):
    with connect(url(live)) as ws:
        ws.send(json.dumps({**json.loads(message("bad", "Hello there. ", cont=False)), **bad}))
        err = json.loads(ws.recv(timeout=30))
        ws.send(message("good", "Still fine. ", cont=False))
        got = receive_until(ws, {"good"})
    assert err["type"] == "error" and err["context_id"] == "bad" and says in err["error"]
    assert 400 <= err["status_code"] < 500 and got[-1]["type"] == "done"


def test_not_json_and_binary_frames_are_errors_not_a_closed_socket(live):
    with connect(url(live)) as ws:
        ws.send("this is not json")
        assert "not valid JSON" in json.loads(ws.recv(timeout=10))["error"]
        ws.send(b"\x00\x01")
        assert "text frames" in json.loads(ws.recv(timeout=10))["error"]
        ws.send(message("after", "Fine. ", cont=False))
        assert receive_until(ws, {"after"})[-1]["type"] == "done"


def test_the_key_is_checked_at_the_handshake(live):
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:
        connect(url(live, "api_key=wrong&cartesia_version=2024-06-10"))
    assert refused.value.response.status_code == 401
    for headers in ({"X-API-Key": TOKEN}, AUTH):  # the header forms work too
        with connect(url(live, "cartesia_version=2024-06-10"), additional_headers=headers) as ws:
            ws.send(message("h", "Header key. ", cont=False))
            assert receive_until(ws, {"h"})[-1]["type"] == "done"


def test_word_times_share_a_phrase_by_word_length():
    t = word_times("a bbb cc", 1.0, 2.0)
    assert t.words == ["a", "bbb", "cc"]
    assert t.start == [1.0, 1.2222, 1.6667] and t.end == [1.2222, 1.6667, 2.0]
    assert word_times("   ", 0.0, 1.0).words == [] and word_times("a", 1.0, 1.0).words == []


def test_the_one_shot_bytes_endpoint_streams_the_asked_format(live):
    """POST /tts/bytes, as LiveKit's synthesize() and pipecat's CartesiaHttpTTSService call it,
    with the key in X-API-Key."""
    body = {"model_id": "sonic-2", "transcript": "Bytes, please.", "language": "en",
            "voice": {"mode": "id", "id": "alloy"},
            "output_format": {"container": "raw", "encoding": "pcm_f32le", "sample_rate": 8000}}
    r = httpx.post(f"{live.url}/tts/bytes", json=body, headers={"X-API-Key": TOKEN}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("audio/")
    seconds = len(r.content) / 4 / 8000  # f32le at 8 kHz
    longest = live.settings.max_audio_length_ms / 1000  # the server's default length
    assert 0.5 < seconds <= longest + 1e-3
    bad = httpx.post(f"{live.url}/tts/bytes", json={**body, "voice": {"mode": "id", "id": "?"}},
                     headers={"X-API-Key": TOKEN}, timeout=60)
    assert bad.status_code == 400 and "unknown voice" in bad.json()["error"]["message"]
    assert httpx.post(f"{live.url}/tts/bytes", json=body, timeout=60).status_code == 401


def test_limits_per_socket_and_text_for_an_ended_context(live):
    from csm_streaming.server.speech_contexts import MAX_CONTEXTS_PER_SOCKET

    with connect(url(live)) as ws:
        for i in range(MAX_CONTEXTS_PER_SOCKET):  # open, never ended: they wait for text
            ws.send(message(f"open-{i}", "Waiting here. "))
        ws.send(message("one-too-many", "Refused. "))
        err = None
        while err is None:
            m = json.loads(ws.recv(timeout=60))
            if m["type"] == "error":
                err = m
        assert err["context_id"] == "one-too-many" and err["status_code"] == 429
        assert str(MAX_CONTEXTS_PER_SOCKET) in err["error"]
        for i in range(MAX_CONTEXTS_PER_SOCKET):
            ws.send(json.dumps({"context_id": f"open-{i}", "cancel": True}))
        ws.send(message("short", "Done soon. ", cont=False))
        receive_until(ws, {"short"})
        ws.send(message("short", "", cont=False))  # a late end packet: nothing to say
        ws.send(message("short", "More text. "))  # text for it: an error
        late = receive_until(ws, {"short"})
    assert late[-1]["type"] == "error" and "has ended" in late[-1]["error"]


def test_a_context_never_ended_is_closed_after_the_idle_timeout(mimi):
    from csm_streaming.server.api import ServerSettings

    server = LiveServer(max_streams=2, settings=ServerSettings(
        token=TOKEN, max_audio_length_ms=4000, context_idle_timeout_s=1.0))
    try:
        with connect(url(server)) as ws:
            ws.send(message("forgotten", "Nobody ends me. "))
            got = receive_until(ws, {"forgotten"})
        assert got[-1]["type"] == "error" and got[-1]["status_code"] == 408
        assert "was not ended" in got[-1]["error"]
        deadline = time.monotonic() + 10  # and its slot is free again
        while server.engine_thread.active and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.engine_thread.active == 0
    finally:
        server.close()


def test_text_spoken_by_the_buffer_delay_still_reports_its_error(live):
    """No sentence end: the text waits max_buffer_delay_ms, then is spoken; an unknown voice is
    found only then, and still reaches the client as that context's error."""
    with connect(url(live)) as ws:
        ws.send(json.dumps({**json.loads(message("late", "no sentence end here",
                                                 max_buffer_delay_ms=200)),
                            "voice": {"mode": "id", "id": "nobody-by-this-name"}}))
        err = json.loads(ws.recv(timeout=30))
        ws.send(message("after", "Still here. ", cont=False))
        assert receive_until(ws, {"after"})[-1]["type"] == "done"
    assert err["type"] == "error" and err["context_id"] == "late"
    assert "unknown voice" in err["error"]
