"""Listen to a running server from another machine (a laptop and a rented GPU).

    csm-stream --server http://localhost:8000 --token T --text "Hi." --play-audio

No torch here: `bash setup.sh --client` installs what this needs. The server's WebSocket
(/v1/stream) sends 16-bit PCM chunks and JSON progress; `stream_from_server` yields float32
chunks and fills a StreamMetrics measured at this end (first audio from the moment the request
is sent, real-time factor of what arrives), so the dashboard shows what the listener gets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict
from urllib.parse import urlparse, urlunparse

import numpy as np

from csm_streaming.audio import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE, pcm16_to_float
from csm_streaming.metrics import StreamMetrics
from csm_streaming.request import SamplingParams


class RemoteError(RuntimeError):
    """The server could not be reached, refused the request, or failed it; says what to do."""


def ws_url(server: str) -> str:
    """http(s)://host:port[/prefix] -> ws(s)://host:port[/prefix]/v1/stream."""
    u = urlparse(server if "://" in server else f"http://{server}")
    if u.scheme not in ("http", "https", "ws", "wss") or not u.netloc:
        raise ValueError(f"--server must be a URL like http://localhost:8000 (got {server!r})")
    scheme = "wss" if u.scheme in ("https", "wss") else "ws"
    return urlunparse((scheme, u.netloc, u.path.rstrip("/") + "/v1/stream", "", "", ""))


def check_server(server: str, timeout: float = 5.0) -> dict:
    """GET /health: the server is there, and what it offers (device, voices, chat)."""
    import httpx

    base = ws_url(server).replace("ws", "http", 1).rsplit("/v1/stream", 1)[0]
    try:
        r = httpx.get(f"{base}/health", timeout=timeout)
        r.raise_for_status()
        return r.json()
    except (httpx.HTTPError, ValueError) as e:
        raise RemoteError(f"no CSM server answers at {base} ({type(e).__name__}: {e}). Is it "
                          "running, and is the SSH tunnel up (ssh -N -L 8000:localhost:8000 "
                          "user@gpu-box)?") from e


class RemoteClosed(RemoteError):
    """The connection ended (or went silent) before the answer did."""


def connect_to(server: str, token: str | None = None):
    """The server's WebSocket, authenticated with the bearer token when there is one."""
    from websockets.exceptions import InvalidStatus, WebSocketException
    from websockets.sync.client import connect

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = ws_url(server)
    try:
        return connect(url, additional_headers=headers, max_size=None, open_timeout=10)
    except (OSError, InvalidStatus, WebSocketException) as e:
        raise RemoteError(f"cannot open {url}: {type(e).__name__}: {e}") from e


def receive_chunks(ws, metrics: StreamMetrics, timeout: float, what: str,
                   on_message=None) -> Iterator[np.ndarray]:
    """float32 chunks from `ws` until the server says done, timed into `metrics` from
    metrics.started (the time a listener spends between chunks is not the server's); JSON
    messages go to on_message. An error message or a lost connection is a RemoteError."""
    from websockets.exceptions import ConnectionClosed

    t_prev = metrics.started
    while True:
        try:
            m = ws.recv(timeout=timeout)
        except (ConnectionClosed, TimeoutError) as e:
            raise RemoteClosed(f"the server closed the {what} before its end ({e})") from e
        if isinstance(m, bytes):
            chunk = pcm16_to_float(m)
            now = time.perf_counter()
            metrics.record_chunk(chunk.size // FRAME_SAMPLES, FRAME_MS, now - t_prev, now)
            yield chunk
            t_prev = time.perf_counter()
            continue
        msg = json.loads(m)
        if on_message is not None:
            on_message(msg)
        if msg.get("type") == "done":
            return
        if msg.get("type") == "error":
            status = msg.get("status")
            hint = " (wrong or missing --token)" if status == 401 else ""
            raise RemoteError(f"the server refused or failed the {what}: {status} "
                              f"{msg.get('message')}{hint}")


def stream_from_server(server: str, message: dict, metrics: StreamMetrics,
                       token: str | None = None, timeout: float = 600.0,
                       on_progress=None) -> Iterator[np.ndarray]:
    """Send one request over the WebSocket; yield float32 chunks as they arrive."""
    with connect_to(server, token) as ws:
        metrics.started = time.perf_counter()
        ws.send(json.dumps(message))
        yield from receive_chunks(ws, metrics, timeout, "request", on_progress)
        metrics.finished, metrics.stop_reason = True, "done"


def request_message(text: str, speaker: int, voice: str | None, sampling: SamplingParams,
                    context=(), kind: str = "speech") -> dict:
    """The first WebSocket message of a request: the SamplingParams' fields are the wire's.
    context: (speaker, text, audio file bytes)."""
    import base64

    msg = {"type": kind, "text": text, "speaker": speaker, **asdict(sampling),
           "context": [{"speaker": s, "text": t, "audio_base64": base64.b64encode(b).decode()}
                       for s, t, b in context]}
    if voice is not None:
        msg["voice"] = voice
    return msg


def audio_seconds(chunks: list[np.ndarray]) -> float:
    return sum(c.size for c in chunks) / SAMPLE_RATE


class ChatSession:
    """Turns of a spoken chat with a server, on one WebSocket (the server keeps the dialogue,
    so the voice stays the same). reply(text) yields float32 chunks; `text` is the reply, and
    on_text(delta), when given, sees each piece of it as it arrives (before its audio)."""

    def __init__(self, server: str, token: str | None = None, voice: str | None = None,
                 speaker: int = 0, on_text=None, sampling: SamplingParams | None = None):
        self.server, self.token, self.timeout = server, token, 600.0
        self.on_text = on_text
        self.first = {"type": "chat", "speaker": speaker, **asdict(sampling or SamplingParams())}
        if voice is not None:
            self.first["voice"] = voice
        self.ws = None
        self.text = ""

    def reply(self, user_text: str, metrics: StreamMetrics) -> Iterator[np.ndarray]:
        if self.ws is None:
            self.ws = connect_to(self.server, self.token)
            message = {**self.first, "text": user_text}
        else:
            message = {"type": "chat", "text": user_text}
        self.text = ""
        metrics.started = time.perf_counter()
        self.ws.send(json.dumps(message))
        try:
            yield from receive_chunks(self.ws, metrics, self.timeout, "reply", self._on_message)
        except RemoteClosed:
            self.ws = None  # the next turn opens a new session
            raise

    def _on_message(self, msg: dict):
        if msg.get("type") == "text":
            self.text += msg["delta"]
            if self.on_text is not None:
                self.on_text(msg["delta"])

    def close(self):
        if self.ws is not None:
            self.ws.close()
