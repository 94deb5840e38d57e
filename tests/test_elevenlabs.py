"""ElevenLabs' input-streaming sockets against the real server (random:tiny), driven as
pipecat's ElevenLabsTTSService (alignment per message, times added up by the client) and
LiveKit's elevenlabs.TTS (sync_alignment=true, close_context after the last flush, mp3 by
default) drive them."""

import base64
import io
import json
import time

import pytest
import soundfile as sf
from websockets.sync.client import connect

from conftest import TOKEN, LiveServer, letters_heard_between
from csm_streaming.server.api import ServerSettings

PATH = "/v1/text-to-speech/{voice}/multi-stream-input"


@pytest.fixture(scope="module")
def live(mimi):
    # 8 s at most per request or context: random weights never end, the tests stay short
    server = LiveServer(max_streams=4,
                        settings=ServerSettings(token=TOKEN, max_audio_length_ms=8000))
    yield server
    server.close()


def open_socket(live, query="model_id=eleven_flash_v2_5&output_format=pcm_16000",
                voice="2", path=PATH, key=TOKEN):
    url = live.url.replace("http", "ws") + path.format(voice=voice) + "?" + query
    return connect(url, additional_headers={"xi-api-key": key})


def until_final(ws, contexts: set, timeout=60):
    got, deadline = [], time.monotonic() + timeout
    while contexts:
        m = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        got.append(m)
        if m.get("isFinal") or m.get("error"):
            contexts.discard(m.get("contextId"))
    return got


def speak_turn(ws, cid, sentences):
    """As the clients do: open with a space, a text message per sentence, flush, close."""
    ws.send(json.dumps({"text": " ", "context_id": cid,
                        "voice_settings": {"stability": 0.5, "similarity_boost": 0.8}}))
    for s in sentences:
        ws.send(json.dumps({"text": s + " ", "context_id": cid}))
    ws.send(json.dumps({"context_id": cid, "flush": True}))
    ws.send(json.dumps({"context_id": cid, "close_context": True}))


def words_of(alignments, summed: bool):
    """Words with start times from alignment messages: pipecat's reading (each message's times
    from where the previous one ended) or LiveKit's (times from the context's start)."""
    words, offset, current, start = [], 0.0, "", None
    for a in alignments:
        for ch, t in zip(a["chars"], a["charStartTimesMs"]):
            if ch == " ":
                if current:
                    words.append((current, start))
                current, start = "", None
            else:
                current += ch
                start = (offset + t) if start is None else start
        if summed:
            offset += a["charStartTimesMs"][-1] + a["charDurationsMs"][-1]
    return words


@pytest.mark.parametrize("sync", [False, True])
def test_a_turn_is_spoken_with_alignment_both_clients_read_alike(live, sync):
    query = "output_format=pcm_16000" + ("&sync_alignment=true" if sync else "")
    with open_socket(live, query) as ws:
        speak_turn(ws, "turn-1", ["Hello there, friend.", "How are you today?"])
        got = until_final(ws, {"turn-1"})
    assert got[-1] == {"isFinal": True, "contextId": "turn-1"}
    assert all(m.get("contextId") == "turn-1" for m in got)
    audio = b"".join(base64.b64decode(m["audio"]) for m in got if m.get("audio"))
    seconds = len(audio) / 2 / 16000
    alignments = [m["alignment"] for m in got if m.get("alignment")]
    words = words_of(alignments, summed=not sync)
    assert [w for w, _ in words] == "Hello there, friend. How are you today?".split()
    starts = [t for _, t in words]
    assert starts == sorted(starts) and starts[0] >= 0 and starts[-1] / 1000 < seconds
    if not sync:  # each message's times start at its phrase: pipecat adds them up
        assert all(a["charStartTimesMs"][0] == 0 for a in alignments)
    else:
        assert len(alignments) == 1 or alignments[1]["charStartTimesMs"][0] > 0


@pytest.mark.parametrize("sync", [False, True])
def test_aligned_words_keep_their_pauses_for_both_clients(live, monkeypatch, sync):
    """With --word-aligner (letters heard from 0.2 to 1.2 s into each phrase) both clients
    read each phrase's first word 0.2-1.2 s after the phrase's start: pipecat's times count
    from each message's phrase and add up to it, LiveKit's from the context's start."""
    monkeypatch.setattr(live.app.state.ctx, "aligner", letters_heard_between(10, 60))
    query = "output_format=pcm_16000" + ("&sync_alignment=true" if sync else "")
    with open_socket(live, query) as ws:
        speak_turn(ws, "heard", ["Hello there, friend.", "How are you today?"])
        got = until_final(ws, {"heard"})
    alignments = [m["alignment"] for m in got if m.get("alignment")]
    words = words_of(alignments, summed=not sync)
    assert [w for w, _ in words] == "Hello there, friend. How are you today?".split()
    phrase_start = 0.0
    for a in alignments:
        assert 200 - 0.1 <= a["charStartTimesMs"][0] - phrase_start <= 1200
        if sync:  # the next phrase starts where this one's last character (a space) ends
            phrase_start = a["charStartTimesMs"][-1] + a["charDurationsMs"][-1]


def test_livekit_default_mp3_is_decodable_at_its_rate(live):
    with open_socket(live, "output_format=mp3_22050_32&sync_alignment=true") as ws:
        speak_turn(ws, "mp3", ["An mp3 for the agent."])
        got = until_final(ws, {"mp3"})
    data = b"".join(base64.b64decode(m["audio"]) for m in got if m.get("audio"))
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")  # libsndfile, not FFmpeg
    assert rate == 22050 and audio.shape[0] > 0.5 * 22050


def test_barge_in_stops_one_context_and_leaves_the_other(live):
    with open_socket(live) as ws:
        ws.send(json.dumps({"text": " ", "context_id": "a"}))
        ws.send(json.dumps({"text": "This turn is interrupted. ", "context_id": "a"}))
        ws.send(json.dumps({"text": "This one goes on. ", "context_id": "b", "flush": True}))
        while True:  # a speaks (its text is waiting for a flush or the delay)... b does
            m = json.loads(ws.recv(timeout=60))
            if m.get("contextId") == "b" and m.get("audio"):
                break
        ws.send(json.dumps({"text": "", "context_id": "a", "close_context": True,
                            "immediate": True}))
        ws.send(json.dumps({"context_id": "b", "close_context": True}))
        got = until_final(ws, {"a", "b"})
    a_final = next(i for i, m in enumerate(got) if m.get("contextId") == "a")
    assert got[a_final] == {"isFinal": True, "contextId": "a"}  # nothing of a before it
    assert got[-1] == {"isFinal": True, "contextId": "b"}


def test_the_single_context_socket_ends_on_empty_text(live):
    with open_socket(live, "output_format=pcm_24000", path="/v1/text-to-speech/{voice}/"
                     "stream-input") as ws:
        ws.send(json.dumps({"text": " ", "voice_settings": {}}))
        ws.send(json.dumps({"text": "One context only. "}))
        ws.send(json.dumps({"text": ""}))
        got = []
        while not got or not got[-1].get("isFinal"):
            got.append(json.loads(ws.recv(timeout=60)))
    assert "contextId" not in got[-1] and any(m.get("audio") for m in got)


def test_bad_format_and_key(live):
    from websockets.exceptions import InvalidStatus

    with open_socket(live, "output_format=ulaw_8000") as ws:
        speak_turn(ws, "u", ["Hi."])
        err = json.loads(ws.recv(timeout=30))
    assert "ulaw_8000" in err["error"] and err["status_code"] == 400
    with pytest.raises(InvalidStatus) as refused:
        open_socket(live, key="wrong")
    assert refused.value.response.status_code == 401


def test_the_one_shot_endpoints_answer_audio_in_the_asked_format(live):
    """As LiveKit's synthesize() posts: xi-api-key, output_format in the query (the streaming
    path), or ElevenLabs' default mp3_44100_128 (the plain one)."""
    import httpx

    r = httpx.post(f"{live.url}/v1/text-to-speech/3/stream?output_format=pcm_16000"
                   "&enable_logging=true", json={"text": "One shot.", "model_id": "flash"},
                   headers={"xi-api-key": TOKEN}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/pcm"
    longest = live.settings.max_audio_length_ms / 1000  # the server's default length
    assert 0.5 < len(r.content) / 2 / 16000 <= longest + 1e-3
    mp3 = httpx.post(f"{live.url}/v1/text-to-speech/3", json={"text": "Default format."},
                     headers={"xi-api-key": TOKEN}, timeout=60)
    audio, rate = sf.read(io.BytesIO(mp3.content), dtype="float32")
    assert mp3.headers["content-type"] == "audio/mpeg" and rate == 44100 and len(audio) > 0
    bad = httpx.post(f"{live.url}/v1/text-to-speech/3?output_format=ulaw_8000",
                     json={"text": "Hi."}, headers={"xi-api-key": TOKEN}, timeout=60)
    assert bad.status_code == 400 and "output_format" in bad.json()["error"]["message"]
