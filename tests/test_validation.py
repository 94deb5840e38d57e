"""One validation for every route: the same limits and the same words on /v1/audio/speech,
/api/generate and the WebSocket; parse errors that say what to send; OpenAI's model list."""

import json

import httpx
import pytest

from conftest import AUTH, TOKEN, LiveServer


@pytest.fixture(scope="module")
def live(mimi):
    server = LiveServer(max_streams=2)
    yield server
    server.close()


# (field, value, words the message must hold): each is wrong on every route alike
BAD = [
    ("top_k", 2**70, "top_k"),
    ("top_k", 0, "top_k"),
    ("seed", 2**70, "seed"),
    ("seed", -1, "seed"),
    ("temperature", 0, "temperature"),
    ("temperature", True, "not true/false"),
    ("max_audio_length_ms", 10, "max_audio_length_ms"),
]
SPEAKER = {"speech": "voice", "generate": "speaker_id", "ws": "speaker"}


def over_http(live, route: str, extra: dict) -> httpx.Response:
    if route == "speech":
        body = {"input": "Hi.", "response_format": "pcm", **extra}
        return httpx.post(f"{live.url}/v1/audio/speech", json=body, headers=AUTH, timeout=60)
    body = {"text": "Hi.", **extra}
    return httpx.post(f"{live.url}/api/generate", json=body, headers=AUTH, timeout=60)


def over_ws(live, extra: dict) -> dict:
    from websockets.sync.client import connect

    with connect(live.url.replace("http", "ws") + "/v1/stream") as ws:
        ws.send(json.dumps({"text": "Hi.", "token": TOKEN, **extra}))
        return json.loads(ws.recv(timeout=30))


@pytest.mark.parametrize("field, value, says", BAD + [(None, 64, "63"), (None, 2**70, "63"),
                                                       (None, True, "true/false")])
def test_the_same_bad_value_is_refused_alike_on_every_route(live, field, value, says):
    messages = []
    for route in ("speech", "generate"):
        name = field or SPEAKER[route]
        r = over_http(live, route, {name: value})
        assert 400 <= r.status_code < 500, (route, r.status_code, r.text)
        messages.append(r.json()["error"]["message"])
    reply = over_ws(live, {field or SPEAKER["ws"]: value})
    assert reply["type"] == "error" and 400 <= reply["status"] < 500
    messages.append(reply["message"])
    for m in messages:
        assert says in m and "Traceback" not in m and " object at 0x" not in m
    if field is not None:  # a sampling field: literally the same words everywhere
        assert len(set(messages)) == 1, messages


def test_an_unknown_model_is_a_404_and_the_list_names_the_known(live):
    listed = httpx.get(f"{live.url}/v1/models", headers=AUTH, timeout=10).json()
    ids = [m["id"] for m in listed["data"]]
    assert listed["object"] == "list" and "csm-1b" in ids and "tts-1" in ids
    r = over_http(live, "speech", {"model": "whisper-9", "max_audio_length_ms": 160})
    assert r.status_code == 404 and "GET /v1/models" in r.json()["error"]["message"]
    ok = over_http(live, "speech", {"model": "tts-1", "max_audio_length_ms": 160})
    assert ok.status_code == 200 and len(ok.content) == 2 * 1920 * 2


@pytest.mark.parametrize("speed", [0, -1, 0.2, 4.5, 100])
def test_speed_outside_openais_range_is_a_400_as_openai_answers(live, speed):
    r = over_http(live, "speech", {"speed": speed})
    assert r.status_code == 400 and "speed" in r.json()["error"]["message"]


@pytest.mark.parametrize("content, says", [
    (b'{"input": "Hi.", "voice": "\xff\xfe"}', "UTF-8"),
    (b"this is not json", "not valid JSON"),
])
def test_a_body_that_is_not_utf8_json_says_what_to_send(live, content, says):
    r = httpx.post(f"{live.url}/v1/audio/speech", content=content, timeout=30,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert 400 <= r.status_code < 500
    message = r.json()["error"]["message"]
    assert says in message and "decode error" not in message, message


def test_a_speech_client_that_leaves_is_counted_once_as_499(live):
    import socket
    import time

    def count(status: str) -> float:
        text = httpx.get(f"{live.url}/metrics", headers=AUTH, timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("csm_requests_total{") and 'route="/v1/audio/speech"' in line
                   and f'status="{status}"' in line)

    before = count("499"), count("200")
    body = json.dumps({"input": "Leave early.", "response_format": "pcm",
                       "max_audio_length_ms": 3000}).encode()
    with socket.create_connection(("127.0.0.1", live.port)) as s:
        s.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  + f"\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n"
                  .encode() + body)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")  # the stream is under way
    deadline = time.monotonic() + 15
    while count("499") == before[0] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert count("499") == before[0] + 1 and count("200") == before[1]
