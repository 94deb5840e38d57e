"""Local stand-ins for the LLM providers, speaking their real streaming wire formats on
127.0.0.1, so the official SDKs (openai, google-genai) run unchanged against them.

- OpenAI chat completions: POST {base}/chat/completions with "stream": true -> server-sent
  events of `chat.completion.chunk` objects, then `data: [DONE]`.
- Gemini: POST .../models/{model}:streamGenerateContent?alt=sse -> server-sent events of
  GenerateContentResponse objects (candidates[0].content.parts[0].text).

`tokens` are sent one event each, `delay` seconds apart; `sent_last_at` is when the last went.
`fail` makes the next requests fail: an HTTP status (401, 500...) or "hang" (no answer).
GET answers what `llm.check` asks: the model list (OpenAI), a model by name (Gemini).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LLMStub:
    def __init__(self, kind: str, tokens: list[str], delay: float = 0.05):
        assert kind in ("openai", "gemini")
        self.kind, self.tokens, self.delay = kind, tokens, delay
        self.fail: int | str | None = None
        self.models = ["stub-model"]  # what the endpoint lists
        self.requests: list[dict] = []  # (path, headers, body) of each request
        self.sent_last_at: float | None = None
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # what llm.check asks: the model list (OpenAI), a model (Gemini)
                stub.requests.append({"path": self.path, "headers": dict(self.headers)})
                if stub.fail == "hang":
                    time.sleep(30)
                    return
                if stub.fail is not None:
                    return self._error(int(stub.fail))
                path = self.path.split("?")[0]
                if stub.kind == "openai" and path.endswith("/models"):
                    return self._json(200, {"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "stub"}
                        for m in stub.models]})
                model = path.rsplit("/models/", 1)[-1]
                if stub.kind == "gemini" and model in stub.models:
                    return self._json(200, {"name": f"models/{model}", "displayName": model})
                self._error(404)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                stub.requests.append({"path": self.path, "headers": dict(self.headers),
                                      "body": body})
                if stub.fail == "hang":
                    time.sleep(30)
                    return
                if stub.fail is not None:
                    return self._error(int(stub.fail))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                for i, token in enumerate(stub.tokens):
                    time.sleep(stub.delay)
                    self._event(stub.event(i, token))
                    if i == len(stub.tokens) - 1:
                        stub.sent_last_at = time.perf_counter()
                if stub.kind == "openai":
                    self._event(stub.event(len(stub.tokens), None))
                    self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _event(self, obj):
                self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
                self.wfile.flush()

            def _error(self, status):
                message = f"stub error {status}"
                if stub.kind == "openai":
                    body = {"error": {"message": message, "type": "stub", "code": None}}
                else:
                    state = "PERMISSION_DENIED" if status == 403 else "INTERNAL"
                    body = {"error": {"code": status, "message": message, "status": state}}
                self._json(status, body)

            def _json(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}" + ("/v1" if self.kind == "openai" else "")

    def event(self, i: int, token: str | None) -> dict:
        if self.kind == "openai":
            delta = {} if token is None else {"content": token}
            if i == 0:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "finish_reason": None if token else "stop"}
            return {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0,
                    "model": "stub", "choices": [choice]}
        candidate = {"content": {"parts": [{"text": token}], "role": "model"}, "index": 0}
        if i == len(self.tokens) - 1:
            candidate["finishReason"] = "STOP"
        return {"candidates": [candidate], "modelVersion": "stub"}

    def config(self, **kw):
        from csm_streaming.chat.llm import LLMConfig

        return LLMConfig(self.kind, "stub-model", "stub-key", self.base_url, **kw)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
