"""HTTP and WebSocket front of the engine: many clients stream at once, batched on one device.

    python server.py --model random:tiny --host 127.0.0.1 --port 8000

Routes: POST /api/generate (base64 WAV), POST /v1/audio/speech (OpenAI-compatible, streamed),
WebSocket /v1/stream (PCM chunks + JSON progress), GET /health, GET /metrics (Prometheus).
Every active stream advances in the same batched frame step (scheduler.Scheduler). Errors are
JSON with a message a client can act on; binds to 127.0.0.1 unless told otherwise; a bearer
token (--token or $CSM_SERVER_TOKEN) guards every route but /health when set.
"""


import argparse
import asyncio
import base64
import hmac
import io
import json
import logging
import os
import struct
import sys
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("csm.server")

SAMPLE_RATE = 24_000
# OpenAI voice names mapped to CSM speaker ids (CSM's speakers are just numbers; "0", "1", ...
# also work).
VOICES = {"alloy": 0, "echo": 1, "fable": 2, "onyx": 3, "nova": 4, "shimmer": 5, "ash": 6,
          "ballad": 7, "coral": 8, "sage": 9, "verse": 10}
MAX_SPEAKER = 63


@dataclass(frozen=True)
class ServerSettings:
    token: str | None = None
    max_text_chars: int = 2000
    max_context: int = 8
    max_context_audio_s: float = 60.0
    max_body_bytes: int = 32 * 2**20
    max_audio_length_ms: float = 90_000
    watermark_window_ms: int = 2000


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# ---------------------------------------------------------------------------------------------
# Audio encoding
# ---------------------------------------------------------------------------------------------


def pcm16(audio) -> bytes:
    a = np.asarray(audio.detach().cpu().numpy() if hasattr(audio, "detach") else audio, dtype=np.float32)
    return (np.clip(a, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_header(n_bytes: int | None, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 16-bit mono WAV header; n_bytes None = unknown length (streamed), as 0xFFFFFFFF."""
    data = 0xFFFFFFFF if n_bytes is None else n_bytes
    riff = 0xFFFFFFFF if n_bytes is None else 36 + n_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate,
            sample_rate * 2, 2, 16) + b"data" + struct.pack("<I", data))


def wav_bytes(audio, sample_rate: int = SAMPLE_RATE) -> bytes:
    body = pcm16(audio)
    return wav_header(len(body), sample_rate) + body


def decode_audio_base64(b64: str, where: str):
    """base64 of an audio file (wav, flac, ogg; any rate and channels) -> (samples, rate)."""
    import soundfile as sf
    import torch

    try:
        raw = base64.b64decode(b64, validate=True)
    except (ValueError, TypeError):
        raise ApiError(400, f"{where}: not valid base64")
    try:
        data, sr = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except Exception:
        raise ApiError(400, f"{where}: not a readable audio file (send WAV, FLAC or OGG, base64-encoded)")
    return torch.from_numpy(data.T.copy()), sr


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def create_app(scheduler, settings: ServerSettings):
    from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from generator import Segment, validate_request

    app = FastAPI(title="CSM-1B streaming server", docs_url="/docs", redoc_url=None)
    gen = scheduler.generator
    watermarker = gen.generator._watermarker
    wm_key = gen.generator._watermark_key

    class ContextItem(BaseModel):
        model_config = ConfigDict(extra="forbid")
        speaker: int
        text: str
        audio_base64: str

    class GenerateBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: str
        speaker_id: int = 0
        temperature: float = 0.9
        top_k: int = 50
        max_audio_length_ms: float = 10_000
        seed: int | None = None
        context: list[ContextItem] = Field(default_factory=list)

    class SpeechBody(BaseModel):
        model: str = "csm-1b"
        input: str
        voice: str | int = "0"
        response_format: str = "wav"
        speed: float = 1.0
        stream_format: str = "audio"
        instructions: str | None = None
        # extensions beyond OpenAI's API
        temperature: float = 0.9
        top_k: int = 50
        seed: int | None = None
        max_audio_length_ms: float | None = None

    # -- errors: always JSON, never a stack trace ---------------------------------------------------

    def error(status: int, message: str, headers=None):
        return JSONResponse({"error": {"message": message, "status": status}}, status_code=status,
                            headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        scheduler.metrics.count_request(request.url.path, exc.status)
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        scheduler.metrics.count_request(request.url.path, 422)
        return error(422, "; ".join(parts) or "invalid request body")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        log.exception("unhandled error on %s", request.url.path)
        scheduler.metrics.count_request(request.url.path, 500)
        return error(500, f"internal error ({type(exc).__name__}); see the server log")

    # -- auth and body size: plain ASGI middleware (works for WebSockets too) -----------------------

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if settings.token and request.url.path != "/health":
            if not _token_ok(request.headers.get("authorization"), settings.token):
                scheduler.metrics.count_request(request.url.path, 401)
                return error(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                             {"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            scheduler.metrics.count_request(request.url.path, 413)
            return error(413, f"request body over {settings.max_body_bytes} bytes")
        return await call_next(request)

    # -- shared request handling --------------------------------------------------------------------

    async def make_request(text, speaker, context_items, max_ms, temperature, topk, seed):
        if isinstance(text, str) and len(text) > settings.max_text_chars:  # the rest: validate_request
            raise ApiError(413, f"text is {len(text)} characters; the limit is {settings.max_text_chars}")
        if len(context_items) > settings.max_context:
            raise ApiError(400, f"{len(context_items)} context turns; the limit is {settings.max_context}")
        if max_ms is not None and max_ms > settings.max_audio_length_ms:
            raise ApiError(400, f"max_audio_length_ms over the limit of {settings.max_audio_length_ms:g}")
        context = []
        for i, c in enumerate(context_items):
            audio, sr = await asyncio.to_thread(decode_audio_base64, c.audio_base64, f"context[{i}].audio_base64")
            if audio.shape[-1] / sr > settings.max_context_audio_s:
                raise ApiError(413, f"context[{i}] audio is over {settings.max_context_audio_s:g} s")
            context.append(Segment(c.speaker, c.text, audio, sr))
        if max_ms is None:  # the longest the window allows (the model ends speech by itself)
            window_ms = (gen.generator.max_seq_len - 256) * 80
            max_ms = max(80, min(settings.max_audio_length_ms, window_ms))
        try:
            return validate_request(text, speaker, context, max_ms, temperature, topk, seed)
        except ValueError as e:
            raise ApiError(400, str(e))

    def submit(req):
        from scheduler import QueueFull

        try:
            return scheduler.submit(req, asyncio.get_running_loop())
        except QueueFull as e:
            raise ApiError(503, str(e), {"Retry-After": str(scheduler.retry_after_s())})

    async def marked(ticket, request: Request | None = None):
        """The ticket's chunks, watermarked in windows off the event loop, as they come."""
        marker = None
        if watermarker is not None:
            from watermarking import StreamMarker

            marker = StreamMarker(watermarker, wm_key, SAMPLE_RATE, settings.watermark_window_ms)
        try:
            async for chunk in ticket.chunks():
                if marker is None:
                    yield chunk
                    continue
                for w in await asyncio.to_thread(marker.feed, chunk):
                    yield w
            if marker is not None:
                for w in await asyncio.to_thread(marker.flush):
                    yield w
        finally:
            ticket.cancel()  # a no-op when it finished; frees the slot when the client left

    def failure(e: Exception) -> ApiError:
        from generator import EmptyOutputError

        if isinstance(e, ApiError):
            return e
        if isinstance(e, ValueError):
            return ApiError(400, str(e))
        if isinstance(e, MemoryError):
            return ApiError(503, str(e), {"Retry-After": str(scheduler.retry_after_s())})
        if isinstance(e, EmptyOutputError):
            return ApiError(422, str(e))
        return ApiError(500, f"generation failed ({type(e).__name__}: {str(e)[:200]})")

    # -- routes ---------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "device": str(gen.device), "active_streams": scheduler.active,
                "queued": scheduler.queued, "slots": scheduler.slots,
                "watermark": watermarker is not None}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(scheduler.metrics.render(scheduler.active, scheduler.queued, scheduler.slots),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/api/generate")
    async def api_generate(body: GenerateBody, request: Request):
        t0 = time.perf_counter()
        req = await make_request(body.text, body.speaker_id, body.context, body.max_audio_length_ms,
                                 body.temperature, body.top_k, body.seed)
        ticket = submit(req)
        chunks = []

        async def collect():
            async for chunk in marked(ticket):
                chunks.append(chunk)

        task = asyncio.create_task(collect())
        try:  # wait for the audio; a client that goes away cancels the stream
            while not (await asyncio.wait({task}, timeout=0.5))[0]:
                if await request.is_disconnected():
                    ticket.cancel()
                    task.cancel()
                    raise ApiError(499, "client disconnected")
            task.result()
        except ApiError:
            raise
        except Exception as e:
            raise failure(e)
        import torch

        audio = torch.cat(chunks) if chunks else torch.zeros(0)
        run_ms = (time.perf_counter() - t0) * 1000
        duration_ms = audio.numel() / SAMPLE_RATE * 1000
        scheduler.metrics.count_request("/api/generate", 200)
        return {"audio_data": base64.b64encode(wav_bytes(audio)).decode(), "format": "wav",
                "encoding": "base64", "sample_rate": SAMPLE_RATE, "duration_ms": duration_ms,
                "run_time_ms": run_ms, "rtf": run_ms / duration_ms if duration_ms else None}

    @app.post("/v1/audio/speech")
    async def speech(body: SpeechBody, request: Request):
        fmt = body.response_format.lower()
        if fmt not in ("wav", "pcm"):
            raise ApiError(400, f"response_format '{body.response_format}' is not supported: use 'wav' or 'pcm'")
        if body.stream_format not in ("audio", "sse"):
            raise ApiError(400, "stream_format must be 'audio' or 'sse'")
        speaker = voice_to_speaker(body.voice)
        req = await make_request(body.input, speaker, [], body.max_audio_length_ms, body.temperature,
                                 body.top_k, body.seed)
        ticket = submit(req)
        agen = marked(ticket)
        try:  # wait for the first chunk, so that errors still get a proper status
            first = await agen.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as e:
            await agen.aclose()
            raise failure(e)
        scheduler.metrics.count_request("/v1/audio/speech", 200)

        async def audio_bytes():
            try:
                if fmt == "wav":
                    yield wav_header(None)
                if first is not None:
                    yield pcm16(first)
                async for chunk in agen:
                    yield pcm16(chunk)
            finally:  # the client may have left: free the slot now, not when collected
                await agen.aclose()

        async def sse():
            n = 0
            try:
                if first is not None:
                    n += first.numel()
                    yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(pcm16(first)).decode()})
                async for chunk in agen:
                    n += chunk.numel()
                    yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(pcm16(chunk)).decode()})
                yield _sse({"type": "speech.audio.done", "audio_ms": n / SAMPLE_RATE * 1000})
            finally:
                await agen.aclose()

        if body.stream_format == "sse":
            return StreamingResponse(sse(), media_type="text/event-stream")
        media = "audio/wav" if fmt == "wav" else "audio/pcm"
        return StreamingResponse(audio_bytes(), media_type=media,
                                 headers={"X-Sample-Rate": str(SAMPLE_RATE)})

    @app.websocket("/v1/stream")
    async def ws_stream(ws: WebSocket):
        if settings.token:
            header = ws.headers.get("authorization")
            query = ws.query_params.get("token")
            if not (_token_ok(header, settings.token) or (query and hmac.compare_digest(query, settings.token))):
                await ws.close(code=1008, reason="missing or wrong token")
                return
        await ws.accept()
        try:
            msg = await ws.receive_json()
        except (WebSocketDisconnect, json.JSONDecodeError, ValueError, KeyError):
            await _ws_error(ws, 400, "send one JSON request first: {\"text\": ..., \"speaker\": 0}")
            return
        try:
            if not isinstance(msg, dict):
                raise ApiError(400, "the request must be a JSON object")
            items = [ContextItem(**c) for c in msg.get("context", [])]
            req = await make_request(msg.get("text"), msg.get("speaker", 0), items,
                                     msg.get("max_audio_length_ms"), msg.get("temperature", 0.9),
                                     msg.get("top_k", 50), msg.get("seed"))
            ticket = submit(req)
        except ApiError as e:
            await _ws_error(ws, e.status, e.message)
            return
        except Exception as e:  # a malformed context item, and alike
            await _ws_error(ws, 400, f"bad request: {e}")
            return

        async def watch_close():  # closing the socket cancels the stream
            try:
                while True:
                    m = await ws.receive()
                    if m.get("type") == "websocket.disconnect":
                        break
            except Exception:
                pass
            ticket.cancel()

        watcher = asyncio.create_task(watch_close())
        samples = chunks = 0
        try:
            async for chunk in marked(ticket):
                await ws.send_bytes(pcm16(chunk))
                samples += chunk.numel()
                chunks += 1
                m = ticket.metrics
                await ws.send_json({"type": "progress", "chunk": chunks,
                                    "audio_ms": samples / SAMPLE_RATE * 1000,
                                    "rtf": m.rtf if m and m.audio_s else None,
                                    "time_to_first_audio_ms": m.first_audio_s * 1000 if m and m.first_audio_s else None})
            await ws.send_json({"type": "done", "audio_ms": samples / SAMPLE_RATE * 1000,
                                "sample_rate": SAMPLE_RATE, "format": "pcm_s16le"})
            scheduler.metrics.count_request("/v1/stream", 200)
            await ws.close()
        except WebSocketDisconnect:
            ticket.cancel()
        except Exception as e:
            ticket.cancel()
            err = failure(e)
            await _ws_error(ws, err.status, err.message)
        finally:
            watcher.cancel()

    return app


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def _ws_error(ws, status, message):
    try:
        await ws.send_json({"type": "error", "status": status, "message": message})
        await ws.close(code=1008 if status in (401, 403) else 1003 if status < 500 else 1011)
    except Exception:
        pass


def _token_ok(header: str | None, token: str) -> bool:
    if not header or not header.lower().startswith("bearer "):
        return False
    return hmac.compare_digest(header[7:].strip(), token)


def voice_to_speaker(voice) -> int:
    if isinstance(voice, int) and not isinstance(voice, bool):
        sid = voice
    elif isinstance(voice, str) and voice.strip().isdigit():
        sid = int(voice.strip())
    elif isinstance(voice, str) and voice.strip().lower() in VOICES:
        return VOICES[voice.strip().lower()]
    else:
        raise ApiError(400, f"unknown voice {voice!r}: use a speaker number 0..{MAX_SPEAKER} or one of "
                            + ", ".join(VOICES))
    if not 0 <= sid <= MAX_SPEAKER:
        raise ApiError(400, f"voice {sid} is out of range 0..{MAX_SPEAKER}")
    return sid


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def serve_in_thread(app, host: str = "127.0.0.1", timeout: float = 30):
    """Run `app` under uvicorn in a daemon thread on a free port of `host` (tests, benchmarks).

    Returns (uvicorn.Server, thread, base url) once it listens; stop it with
    `server.should_exit = True` and `thread.join()`.
    """
    import socket
    import threading

    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.05)
    return server, thread, f"http://{host}:{port}"


def build_parser():
    p = argparse.ArgumentParser(description="Serve CSM-1B speech to many clients at once.")
    p.add_argument("--model", default=None, help="hub repo, local folder, or random:tiny / random:csm-1b")
    p.add_argument("--mimi", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=os.environ.get("CSM_SERVER_TOKEN"),
                   help="bearer token required on every route but /health (or $CSM_SERVER_TOKEN)")
    p.add_argument("--max-streams", type=int, default=8, help="streams advanced together (engine slots)")
    p.add_argument("--max-queue", type=int, default=32, help="requests that may wait for a slot")
    p.add_argument("--max-text-chars", type=int, default=2000)
    p.add_argument("--max-body-mb", type=float, default=32)
    p.add_argument("--chunk-size", type=int, default=320, metavar="MS")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-watermark", action="store_true")
    p.add_argument("--watermark-key", default=None)
    return p


def load_scheduler(args):
    from generator import DEFAULT_REPO
    from scheduler import Scheduler
    from streaming_generator import StreamingConfig, load_streaming_csm_1b

    config = StreamingConfig(chunk_size_ms=args.chunk_size, max_batch_size=args.max_streams,
                             enable_compilation=False if args.no_compile else None,
                             enable_cuda_graphs=not args.no_cuda_graphs)
    sg = load_streaming_csm_1b(device=args.device, config=config, model=args.model or DEFAULT_REPO,
                               mimi=args.mimi, watermark=not args.no_watermark,
                               watermark_key=args.watermark_key)
    if sg.needs_warmup:  # every batch bucket, before the first client: no stall when one joins
        log.info("warm-up of %d-slot batch buckets: %.1f s", args.max_streams, sg.warmup(all_buckets=True))
    return Scheduler(sg, max_queue=args.max_queue)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from generator import CheckpointError
    from watermarking import WatermarkError

    try:
        scheduler = load_scheduler(args)
    except (CheckpointError, WatermarkError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.token:
        log.warning("listening on %s without a token: anyone who can reach it can use it", args.host)
    settings = ServerSettings(token=args.token, max_text_chars=args.max_text_chars,
                              max_body_bytes=int(args.max_body_mb * 2**20))
    app = create_app(scheduler.start(), settings)
    import uvicorn

    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        scheduler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
