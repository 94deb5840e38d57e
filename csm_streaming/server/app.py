"""HTTP and WebSocket front of the engine: many clients stream at once, batched on one device.

    csm-server --model random:tiny --host 127.0.0.1 --port 8000

Routes (routes.py): POST /api/generate (base64 WAV), POST /v1/audio/speech (OpenAI-compatible,
streamed), WebSocket /v1/stream (PCM chunks + JSON progress), GET /health, GET /metrics
(Prometheus). Every active stream advances in the same batched frame step (engine/scheduler.py).
Errors are JSON with a message a client can act on; binds to 127.0.0.1 unless told otherwise; a
bearer token (--token or $CSM_SERVER_TOKEN) guards every route but /health when set. Request
contract, limits and auth: api.py. This file: the process (uvicorn settings, the command).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

import uvicorn

from csm_streaming.engine.voices import DEFAULT_VOICES_DIR
from csm_streaming.engine.word_align import DEFAULT_ALIGNER, CtcAligner
from csm_streaming.options import (
    HelpFormatter,
    add_model_arguments,
    config_arguments,
    load_arguments,
)
from csm_streaming.server import (
    cartesia_routes,
    chat_routes,
    elevenlabs_routes,
    openapi,
    routes,
    voice_routes,
)
from csm_streaming.server.api import SecretFilter, ServerSettings
from csm_streaming.server.context import ServerContext

log = logging.getLogger("csm.server")


# ---------------------------------------------------------------------------------------------
# uvicorn: timeouts for slow or idle connections, secrets out of the logs
# ---------------------------------------------------------------------------------------------


def create_app(engine_thread, settings: ServerSettings, voices=None, chat=None, aligner=None):
    """The FastAPI app over a started EngineThread: the speech routes, the chat routes when an LLM
    is configured (chat: an llm.LLMConfig), limits and JSON errors. voices: a VoiceLibrary;
    aligner: a word_align.CtcAligner for the context sockets' word times (None: estimated)."""
    from fastapi import FastAPI

    app = FastAPI(title="CSM-1B streaming server", docs_url="/docs", redoc_url=None)
    ctx = ServerContext(app, engine_thread, settings, voices, chat, aligner)
    ctx.chat_session = chat_routes.chat_session
    app.state.ctx = ctx
    for module in (routes, chat_routes, voice_routes, cartesia_routes, elevenlabs_routes):
        app.include_router(module.router)
    routes.add_limits_and_errors(app)
    openapi.install(app, token=settings.token is not None)
    return app


LAST_RESORT_CONNECTIONS = 4096  # uvicorn's plain-text 503 past this (the budgets' JSON first)
SEND_BUFFER_BYTES = 128 * 1024  # per connection, in the kernel: ~3 s of 16-bit audio (doubled)


def uvicorn_config(app, host: str, port: int, settings: ServerSettings, log_level: str = "info"):
    """uvicorn settings that bound what one client can hold: a request head must arrive within
    header_timeout_s (no slowloris), idle keep-alive connections close after 5 s, WebSocket
    messages are capped at the body limit, and each
    connection's kernel send buffer is capped (the default grows to 4 MB, a minute and a half of
    audio a reader could leave unread before the write timeout could see it). How many requests
    run at once is the app's two budgets (ServerContext.strangers, .clients: JSON 503s);
    uvicorn's own cap, far above them, is only the last guard against a flood of sockets that
    never send a request head."""
    import socket

    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutH11(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            self._arm_head_timer()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_head_timer()

        def _arm_head_timer(self):
            waiting_for = self.cycle  # a new request replaces the cycle

            def check():
                upgraded = self.transport.get_protocol() is not self  # now a WebSocket
                if self.cycle is waiting_for and not upgraded and not self.transport.is_closing():
                    self.transport.close()

            self.loop.call_later(settings.header_timeout_s, check)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=HeadTimeoutH11,
                            ws_max_size=settings.max_body_bytes, timeout_keep_alive=5,
                            limit_concurrency=LAST_RESORT_CONNECTIONS)
    for name in ("uvicorn.access", "uvicorn.error"):  # after uvicorn has set its loggers up
        logger = logging.getLogger(name)
        if not any(isinstance(f, SecretFilter) for f in logger.filters):
            logger.addFilter(SecretFilter())
    return config


def serve_in_thread(app, host: str = "127.0.0.1", timeout: float = 30,
                    settings: ServerSettings | None = None):
    """Run `app` under uvicorn in a daemon thread on a free port of `host` (tests, benchmarks).

    Returns (uvicorn.Server, thread, base url) once it listens; stop it with
    `server.should_exit = True` and `thread.join()`.
    """
    import socket
    import threading


    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn_config(app, host, port, settings or ServerSettings(), "warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.05)
    return server, thread, f"http://{host}:{port}"


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


class GracefulServer(uvicorn.Server):
    """uvicorn with a bounded shutdown: on SIGTERM / SIGINT it stops admitting at once, lets
    the running streams go on for `grace_s`, then ends each with an error on its own channel
    (an aborted body, an SSE error event, a WebSocket error message) and exits. A supervisor's
    kill (Kubernetes and systemd wait 30 s) never finds streams that look complete."""

    def __init__(self, config, engine_thread, grace_s: float):
        config.timeout_graceful_shutdown = 5  # after the grace period: uvicorn's own backstop
        super().__init__(config)
        self.engine_thread, self.grace_s = engine_thread, grace_s
        self._draining = False

    def handle_exit(self, sig, frame):
        if self._draining:  # a second signal: stop now
            return super().handle_exit(sig, frame)
        self._draining = True
        self.engine_thread.drain()  # new requests get a 503 from here on
        log.info("shutting down: %d streams get up to %g s to finish", self.engine_thread.active,
                 self.grace_s)
        threading.Thread(target=self._drain_then_exit, args=(sig, frame), daemon=True).start()

    def _drain_then_exit(self, sig, frame):
        """uvicorn closes WebSockets (1012) the moment it stops: so it stops only once the
        streams are done or have been ended with an error each client can see."""
        deadline = time.monotonic() + self.grace_s
        while self.engine_thread.active + self.engine_thread.queued and time.monotonic() < deadline:
            time.sleep(0.1)
        n = self.engine_thread.end_all(f"the server shut down: the stream was cut after the "
                                   f"{self.grace_s:g} s grace period")
        if n:
            log.warning("shutdown: ended %d streams still running after the grace period", n)
            time.sleep(1.0)  # the error messages and aborted bodies go out first
        super().handle_exit(sig, frame)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve CSM-1B speech to many clients at once.",
                                formatter_class=HelpFormatter)
    add_model_arguments(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--token", default=os.environ.get("CSM_SERVER_TOKEN"),
                   help="bearer token required on every route but /health and the page "
                        "(or $CSM_SERVER_TOKEN)")
    p.add_argument(
        "--max-streams", type=int, default=8, help="streams advanced together (engine slots)"
    )
    p.add_argument("--max-queue", type=int, default=32, help="requests that may wait for a slot")
    p.add_argument("--max-text-chars", type=int, default=2000, help="longest text of one request")
    p.add_argument("--max-body-mb", type=float, default=32,
                   help="largest request body or WebSocket message")
    p.add_argument("--shutdown-grace", type=float, default=10.0, metavar="S",
                   help="on SIGTERM, running streams get this long to finish before they are "
                        "ended with an error")
    p.add_argument("--first-message-timeout", type=float, default=5.0, metavar="S",
                   help="a WebSocket that sends no request within this is closed")
    p.add_argument("--max-pending-sockets", type=int, default=64,
                   help="WebSockets not yet authorised (their own budget: strangers cannot "
                        "take the clients' connections)")
    p.add_argument("--allow-voice-writes", action="store_true",
                   help="let anyone add and delete voices when listening beyond this machine "
                        "without --token (off: refused there)")
    p.add_argument("--max-pending-per-address", type=int, default=8,
                   help="of those, how many one source address may hold")
    p.add_argument("--max-connections", type=int, default=512,
                   help="authorised requests and WebSockets at once (then 503, Retry-After)")
    p.add_argument("--chunk-size", type=int, default=320, metavar="MS", help="audio per chunk")
    p.add_argument("--voices-dir", default=None,
                   help="named voices: NAME.wav + NAME.txt (+ NAME.json with the speaker); "
                        f"POST /v1/voices adds to it (None: ./{DEFAULT_VOICES_DIR}, created "
                        "when the first voice is added)")
    p.add_argument("--llm", choices=["gemini", "openai", "auto"], default=None,
                   help="answer chat requests with this LLM (auto: from the environment; "
                        "None: no chat). Keys and models: GOOGLE_API_KEY, GEMINI_MODEL, "
                        "OPENAI_BASE_URL, OPENAI_API_KEY, OPENAI_MODEL")
    p.add_argument("--llm-model", default=None, help="the LLM's model (None: from the environment)")
    p.add_argument("--word-aligner", nargs="?", const=DEFAULT_ALIGNER, default=None,
                   metavar="MODEL",
                   help="time the voice-agent sockets' words where a wav2vec 2.0 CTC model hears "
                        f"them (MODEL: hub id or folder; alone: {DEFAULT_ALIGNER}, Apache-2.0; "
                        "needs transformers). Left out: each phrase's span shared over its words "
                        "(an estimate)")
    return p


def load_engine_thread(args, replica: str | None = None):
    from csm_streaming.engine.config import StreamingConfig
    from csm_streaming.engine.loader import load_streaming_csm_1b
    from csm_streaming.server.engine_thread import EngineThread

    config = StreamingConfig(chunk_size_ms=args.chunk_size, max_batch_size=args.max_streams,
                             **config_arguments(args))
    sg = load_streaming_csm_1b(config=config, **load_arguments(args))
    if sg.needs_warmup:  # every batch bucket, before the first client: no stall when one joins
        log.info(
            "warm-up of %d-slot batch buckets: %.1f s",
            args.max_streams,
            sg.warmup(all_buckets=True),
        )
    return EngineThread(sg, max_queue=args.max_queue, replica=replica)


def local_only(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


def voice_writes(args) -> tuple[bool, str]:
    """May clients add and delete voices, and why (the start-up log says it)."""
    if args.token:
        return True, "clients with the token"
    if local_only(args.host):
        return True, "anyone on this machine (it listens on localhost only)"
    if args.allow_voice_writes:
        return True, "anyone who reaches the port (--allow-voice-writes)"
    return False, "nobody: it listens beyond this machine without --token (--allow-voice-writes)"


def settings_from_args(args) -> ServerSettings:
    return ServerSettings(token=args.token, max_text_chars=args.max_text_chars,
                          max_body_bytes=int(args.max_body_mb * 2**20),
                          first_message_timeout_s=args.first_message_timeout,
                          max_pending_sockets=args.max_pending_sockets,
                          max_pending_sockets_per_address=args.max_pending_per_address,
                          voice_writes=voice_writes(args)[0],
                          max_connections=args.max_connections)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.captureWarnings(True)
    from csm_streaming.chat.llm import LLMConfig, LLMError
    from csm_streaming.chat.llm import check as check_llm
    from csm_streaming.engine.voices import VoiceLibrary, check_folder
    from csm_streaming.model.hub import CheckpointError
    from csm_streaming.model.watermark import WatermarkError

    try:  # what is wrong with the command shows before the model loads
        if args.voices_dir is not None:
            check_folder(args.voices_dir)
        chat = LLMConfig.from_env(args.llm, model=args.llm_model) if args.llm else None
        if chat is not None:
            check_llm(chat)  # the key, the endpoint, the model: in seconds, not after the load
        aligner = CtcAligner.load(args.word_aligner) if args.word_aligner else None
        engine_thread = load_engine_thread(args)
        if aligner is not None:
            aligner.to(engine_thread.generator.generator.device)
        voices = VoiceLibrary.load(args.voices_dir or DEFAULT_VOICES_DIR,
                                   engine_thread.generator.generator)
    except (CheckpointError, WatermarkError, LLMError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("voices: %s; chat: %s", ", ".join(voices.names()) or "none",
             chat.describe() if chat else "off (--llm)")
    settings = settings_from_args(args)
    if not local_only(args.host) and not args.token:
        log.warning(
            "listening on %s without a token: anyone who can reach it can use it", args.host
        )
    log.info("adding and deleting voices: %s", voice_writes(args)[1])
    log.info("word times: %s", f"aligned by {args.word_aligner}" if aligner else
             "estimated (--word-aligner)")
    app = create_app(engine_thread.start(), settings, voices=voices, chat=chat, aligner=aligner)

    try:
        GracefulServer(uvicorn_config(app, args.host, args.port, settings), engine_thread,
                       args.shutdown_grace).run()
    finally:
        engine_thread.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
