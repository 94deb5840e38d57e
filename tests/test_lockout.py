"""Strangers cannot lock clients out: silent WebSockets wait in a budget of their own and are
closed at a deadline, slow request heads are dropped, /health always answers, and the first
message's mistakes are told in words a client can act on."""

import asyncio
import json
import socket
import subprocess
import sys
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


# 70 strangers in a process of their own (as attackers are: in the test's process their
# threads would share the server's interpreter lock and slow everything for the wrong reason).
# They run until the file named by argv[2] exists, then print the refusals they saw.
STRANGERS = """
import json, os, sys, threading, time
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
url, stop_file, hold_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
refusals = []
def stranger():
    while not os.path.exists(stop_file):
        try:
            with connect(url, open_timeout=5) as ws:
                ws.recv(timeout=hold_s)  # held until the first-message deadline closes it
        except InvalidStatus as e:
            refusals.append([e.response.status_code, e.response.headers.get("Retry-After")])
            time.sleep(0.1)  # refused: try again soon (closed ones reconnect at once)
        except Exception:  # closed at the deadline: reconnect
            pass
threads = [threading.Thread(target=stranger) for _ in range(70)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(sorted({tuple(r) for r in refusals})))
"""


def from_elsewhere(live, url: str) -> bool:
    """A stranger from 127.0.0.2 (its own address): True if it got in and was served."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    other = socket.socket()
    other.bind(("127.0.0.2", 0))
    other.connect(("127.0.0.1", live.port))
    try:
        with connect(url, sock=other, open_timeout=10) as ws:
            ws.send(json.dumps({"text": "Elsewhere.", "token": TOKEN, "max_audio_length_ms": 160}))
            return isinstance(ws.recv(timeout=60), bytes)
    except InvalidStatus as e:
        assert e.response.status_code == 503
        return False


@pytest.mark.parametrize("share", ["per address", "all of it"])
def test_strangers_reconnecting_never_lock_out_a_client_that_shows_its_token(live, tmp_path,
                                                                            share):
    """70 tokenless sockets from one address, each reconnecting as soon as it is closed, while
    clients with the token in their handshake (header, query) connect again and again: they are
    served every time, and the strangers are refused for load as HTTP 503 + Retry-After. With
    the per-address share, a stranger from elsewhere still gets a place; with a share of the
    whole budget the strangers fill it, and only the handshake's token lets clients by."""
    from websockets.sync.client import connect

    strangers = live.app.state.ctx.strangers
    per_address = strangers.per_address if share == "per address" else strangers.limit
    strangers.per_address, saved = per_address, strangers.per_address
    url = live.url.replace("http", "ws") + "/v1/stream"
    stop_file = tmp_path / "stop"
    strangers_proc = subprocess.Popen(
        [sys.executable, "-c", STRANGERS, url, str(stop_file), str(DEADLINE_S + 2)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while strangers.by_address.get("127.0.0.1", 0) < per_address \
                and time.monotonic() < deadline:
            time.sleep(0.05)  # the strangers hold their share (however slow this machine is)
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
        elsewhere = from_elsewhere(live, url)
    finally:
        stop_file.write_text("")
        out, err = strangers_proc.communicate(timeout=60)
        strangers.per_address = saved
    assert served == [True] * 6
    assert json.loads(out) == [[503, "1"]], err[-2000:]  # every refusal: 503 + Retry-After
    assert held == per_address  # the strangers' address holds its share, and no more
    assert elsewhere is (share == "per address")
