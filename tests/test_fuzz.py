"""Fuzzed request bodies on every speech route find no 5xx: each is a 200 with audio or a 4xx
with one JSON error shape. Hypothesis, derandomized (the same cases every run), a bounded count."""

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import AUTH, TOKEN, LiveServer

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)
# Lengths stay short (valid ones) so a case that passes validation costs a few frames
LENGTHS = st.sampled_from([80, 160, 0, -1, 79.9, 1e308, "160", True, None, [160]])
FIELDS = {
    "speech": ["input", "voice", "model", "response_format", "speed", "stream_format",
               "temperature", "top_k", "seed"],
    "generate": ["text", "speaker_id", "voice", "temperature", "top_k", "seed", "context"],
    "ws": ["text", "speaker", "voice", "type", "temperature", "top_k", "seed", "context"],
}


@pytest.fixture(scope="module")
def live(mimi):
    server = LiveServer(max_streams=4)
    yield server
    server.close()


def body_for(route):
    fields = st.dictionaries(st.sampled_from(FIELDS[route] + ["extra"]), JSON_VALUES, max_size=5)
    return st.tuples(fields, LENGTHS, st.text(min_size=1, max_size=20))


def check_http(live, route, fields, length, text):
    body = {("input" if route == "speech" else "text"): text, **fields,
            "max_audio_length_ms": length}
    path = "/v1/audio/speech" if route == "speech" else "/api/generate"
    r = httpx.post(f"{live.url}{path}", json=body, headers=AUTH, timeout=120)
    assert r.status_code < 500, (body, r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["status"] == r.status_code and isinstance(error["message"], str)


@pytest.mark.parametrize("route", ["speech", "generate"])
def test_fuzzed_http_bodies_get_no_5xx(live, route):
    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body_for(route))
    def case(parts):
        check_http(live, route, *parts)

    case()


def test_fuzzed_websocket_requests_get_no_5xx(live):
    from websockets.sync.client import connect

    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body_for("ws"))
    def case(parts):
        fields, length, text = parts
        with connect(live.url.replace("http", "ws") + "/v1/stream") as ws:
            ws.send(json.dumps({"text": text, **fields, "token": TOKEN,
                                "max_audio_length_ms": length}))
            while True:
                m = ws.recv(timeout=120)
                if isinstance(m, bytes):
                    continue
                m = json.loads(m)
                if m["type"] == "error":
                    assert m["status"] < 500, (fields, m)
                    return
                if m["type"] == "done":
                    return

    case()
