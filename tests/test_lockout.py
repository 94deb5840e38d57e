"""Strangers cannot lock clients out: silent WebSockets wait in a budget of their own and are
closed at a deadline, slow request heads are dropped, /health always answers, and the first
message's mistakes are told in words a client can act on."""

import asyncio
import json
import socket
import time

import httpx
import pytest

from conftest import AUTH, TOKEN, LiveServer
from csm_streaming.server.api import ServerSettings

DEADLINE_S = 2.0
PENDING = 32


@pytest.fixture(scope="module")
def live(mimi):
    server = LiveServer(max_streams=2, settings=ServerSettings(
        token=TOKEN, first_message_timeout_s=DEADLINE_S, max_pending_sockets=PENDING,
        header_timeout_s=3.0))
    yield server
    server.close()


async def open_silent_sockets(url: str, n: int):
    """n WebSockets that connect and say nothing: (accepted sockets, refused count)."""
    from websockets.asyncio.client import connect

    async def one():
        try:
            return await connect(url, open_timeout=10)
        except Exception:  # refused: the strangers' budget is full
            return None

    socks = await asyncio.gather(*[one() for _ in range(n)])
    return [s for s in socks if s is not None], sum(s is None for s in socks)


async def lockout_attempt(live):
    ws_url = live.url.replace("http", "ws") + "/v1/stream"
    heads = []
    for _ in range(50):  # slow HTTP heads: connected, half a request line, then nothing
        s = socket.create_connection(("127.0.0.1", live.port))
        s.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\n")
        heads.append(s)
    socks, refused = await open_silent_sockets(ws_url, 300)
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        health = await client.get("/health")
        speech = await client.post("/v1/audio/speech", headers=AUTH, json={
            "input": "Still here.", "response_format": "pcm", "max_audio_length_ms": 800})
    served_s = time.monotonic() - t0
    await asyncio.sleep(DEADLINE_S + 1.5)
    closed, messages = 0, []
    for ws in socks:
        try:
            while True:
                messages.append(json.loads(await asyncio.wait_for(ws.recv(), 1)))
        except Exception:  # ConnectionClosed: what we wait for; a timeout: still open
            closed += ws.close_code is not None
    for s in heads:
        s.close()
    return health, speech, served_s, len(socks), refused, closed, messages


def test_silent_sockets_and_slow_heads_do_not_lock_clients_out(live):
    health, speech, served_s, accepted, refused, closed, messages = asyncio.run(
        lockout_attempt(live))
    assert health.status_code == 200 and speech.status_code == 200
    assert len(speech.content) == 10 * 1920 * 2 and served_s < 20
    assert accepted <= PENDING and refused >= 300 - PENDING  # strangers' own small budget
    assert closed == accepted  # every silent socket was closed at the deadline
    assert messages and all(m["type"] == "error" and m["status"] == 408 for m in messages)
    assert live.app.state.ctx.strangers.count == 0


def first_reply(live, send) -> dict:
    from websockets.sync.client import connect

    with connect(live.url.replace("http", "ws") + "/v1/stream") as ws:
        send(ws)
        return json.loads(ws.recv(timeout=10))


@pytest.mark.parametrize("send, says", [
    (lambda ws: ws.send(b'{"text": "Hi."}'), "text frame of UTF-8 JSON"),
    (lambda ws: ws.send("hello"), "not valid JSON"),
    (lambda ws: ws.send("[1, 2]"), "must be a JSON object"),
    (lambda ws: ws.send(json.dumps({"text": "Hi.", "token": TOKEN, "speaker": "x"})), "speaker"),
])
def test_a_bad_first_message_is_told_what_to_send(live, send, says):
    reply = first_reply(live, send)
    assert reply["type"] == "error" and reply["status"] == 400 and says in reply["message"]
    assert "Error:" not in reply["message"] and " object at 0x" not in reply["message"]


def test_an_authorised_socket_is_not_held_to_the_strangers_budget(live):
    """After its first message a socket counts as a client, not as pending."""
    from websockets.sync.client import connect

    with connect(live.url.replace("http", "ws") + "/v1/stream") as ws:
        ws.send(json.dumps({"text": "Counted.", "token": TOKEN, "max_audio_length_ms": 800}))
        first = ws.recv(timeout=60)
        ctx = live.app.state.ctx
        assert isinstance(first, bytes) and ctx.strangers.count == 0 and ctx.clients.count >= 1


def test_strangers_reconnecting_never_lock_out_a_client_that_shows_its_token(live):
    """70 tokenless sockets from one address, each reconnecting as soon as it is closed, while
    a client with `Authorization: Bearer` in its handshake connects again and again: it is
    served every time, and the strangers are refused for load as HTTP 503 + Retry-After."""
    import threading

    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    url = live.url.replace("http", "ws") + "/v1/stream"
    stop, refusals = threading.Event(), []

    def stranger():
        while not stop.is_set():
            try:
                with connect(url, open_timeout=5) as ws:
                    ws.recv(timeout=DEADLINE_S + 2)  # held until the first-message deadline
            except InvalidStatus as e:
                refusals.append((e.response.status_code, e.response.headers.get("Retry-After")))
                time.sleep(0.01)
            except Exception:  # closed at the deadline: reconnect
                pass

    threads = [threading.Thread(target=stranger, daemon=True) for _ in range(70)]
    for t in threads:
        t.start()
    try:
        strangers, deadline = live.app.state.ctx.strangers, time.monotonic() + 30
        while not strangers.by_address.get("127.0.0.1") and time.monotonic() < deadline:
            time.sleep(0.05)  # the strangers are in (however slow this machine is today)
        held = strangers.by_address.get("127.0.0.1", 0)
        served = []
        for i in range(5):
            with connect(url, additional_headers=AUTH, open_timeout=10) as ws:
                ws.send(json.dumps({"text": f"Let me in {i}.", "max_audio_length_ms": 160}))
                served.append(isinstance(ws.recv(timeout=60), bytes))
        query = url + f"?token={TOKEN}"  # the browser's form: no headers on a WebSocket
        with connect(query, open_timeout=10) as ws:
            ws.send(json.dumps({"text": "By query.", "max_audio_length_ms": 160}))
            served.append(isinstance(ws.recv(timeout=60), bytes))
        other = socket.socket()  # a stranger from another address still gets a place
        other.bind(("127.0.0.2", 0))
        other.connect(("127.0.0.1", live.port))
        with connect(url, sock=other, open_timeout=10) as ws:
            ws.send(json.dumps({"text": "Elsewhere.", "token": TOKEN, "max_audio_length_ms": 160}))
            served.append(isinstance(ws.recv(timeout=60), bytes))
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert served == [True] * 7
    assert refusals and {r for r in refusals} == {(503, "1")}
    per_address = live.app.state.ctx.settings.max_pending_sockets_per_address
    assert 0 < held <= per_address  # the strangers' address held its share, and no more
