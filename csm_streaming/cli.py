"""Speak text with CSM-1B while it is generated: the command line (`csm-stream`; in a clone
`python test_streaming.py`).

    csm-stream --text "Hello from Sesame." --play-audio
    csm-stream --model random:tiny --output out.wav      # offline, random weights
    csm-stream --server http://localhost:8000 --play-audio   # a remote GPU (no torch needed)
    csm-stream --chat --play-audio     # talk: an LLM writes, CSM speaks (--llm)

Every argument, context file and the sound card are checked before anything is loaded, so a
mistake costs a second, not the half minute a model takes to load.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from csm_streaming.client.terminal import EXIT_BAD_INPUT, finish, open_player, show_stream
from csm_streaming.options import (
    HelpFormatter,
    add_model_arguments,
    config_arguments,
    load_arguments,
)
from csm_streaming.request import (
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    GenerationRequest,
    SamplingParams,
)

DEFAULT_OUTPUT = "csm_output.wav"  # in the current folder, when neither --output nor --play-audio


@dataclass
class ContextTurn:
    path: str
    text: str
    speaker: int
    audio: object = None  # float32 [channels, samples], read before loading
    rate: int = 0
    raw: bytes = b""  # the file, for a remote server


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Stream speech from CSM-1B, with a live dashboard.",
                                formatter_class=HelpFormatter)
    p.add_argument("--text", default="Hello from Sesame. This is streaming speech, generated "
                   "while you listen.", help="what to say")
    p.add_argument("--speaker", type=int, default=0, help="speaker id (a number)")
    p.add_argument("--voice", default=None, metavar="NAME",
                   help="a named voice of --voices-dir (its clip is the context: the voice stays)")
    p.add_argument("--voices-dir", default="voices", help="named voices: NAME.wav + NAME.txt")
    p.add_argument(
        "--context-audio",
        action="append",
        default=[],
        metavar="FILE",
        help="audio of an earlier turn (any rate, mono or stereo); pair with --context-text",
    )
    p.add_argument("--context-text", action="append", default=[], metavar="TEXT",
                   help="what was said in the matching --context-audio")
    p.add_argument("--context-speaker", action="append", type=int, default=[], metavar="N",
                   help="speaker of the matching context turn (default: --speaker)")
    p.add_argument(
        "--play-audio", action="store_true", help="play through the sound card while generating"
    )
    p.add_argument(
        "--output", metavar="FILE.wav",
        help=f"write exactly the streamed samples to this file (default without --play-audio: "
             f"{DEFAULT_OUTPUT})"
    )
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help="sampling temperature, in (0, 10]")
    p.add_argument("--top-k", "--topk", dest="top_k", type=int, default=DEFAULT_TOP_K,
                   help="sample among the k likeliest codes")
    p.add_argument("--seed", type=int, default=None, help="seed of the random draws (None: random)")
    p.add_argument("--max-audio-ms", type=float, default=None,
                   help="longest audio (None: 90 s; 3 s for random models, which never end)")
    p.add_argument("--no-dashboard", action="store_true",
                   help="plain progress lines instead of the live view (also when not a terminal)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens inside")
    chat = p.add_argument_group("talk: type a message, hear an LLM's reply as it is written")
    chat.add_argument("--chat", action="store_true", help="a conversation, one line per message")
    chat.add_argument("--llm", choices=["auto", "gemini", "openai"], default="auto",
                      help="the reply's writer (auto: GOOGLE_API_KEY -> Gemini, OPENAI_BASE_URL "
                           "or OPENAI_API_KEY -> OpenAI-compatible)")
    chat.add_argument("--llm-model", default=None,
                      help="the LLM's model (None: from the environment)")
    add_remote_arguments(p)
    add_local_arguments(p)
    return p


def add_remote_arguments(p):
    remote = p.add_argument_group("a running server (nothing is loaded here; no torch needed)")
    remote.add_argument(
        "--server",
        metavar="URL",
        default=None,
        help="stream from this server, e.g. http://localhost:8000 through an SSH tunnel",
    )
    remote.add_argument("--token", default=None, help="the server's bearer token")


def add_local_arguments(p):
    local = p.add_argument_group("the model, here")
    add_model_arguments(local)
    local.add_argument("--chunk-size", type=int, default=320, metavar="MS",
                       help="audio per chunk (a multiple of 80)")
    local.add_argument("--first-chunk", type=int, default=160, metavar="MS",
                       help="size of the first chunk (small: sound starts early)")
    local.add_argument("--decode-frames", type=int, default=None, metavar="N",
                       help="frames Mimi decodes per call, dividing both chunk sizes (None: a "
                            "whole chunk per call, the fastest)")
    local.add_argument("--no-normalize", action="store_true",
                       help="do not spell out numbers and symbols")
    local.add_argument("--no-cpu-fallback", action="store_true",
                       help="fail instead of falling back to the CPU when the GPU cannot be used")


# -- checks: before anything is loaded ----------------------------------------------------------


def check_args(args) -> list[ContextTurn]:
    """Every argument and file, checked now; ValueError / FileNotFoundError say what is wrong."""
    from csm_streaming.audio import read_audio

    args.sampling = SamplingParams(args.temperature, args.top_k, args.seed, args.max_audio_ms)
    GenerationRequest(args.text, args.speaker, (), args.sampling)
    if len(args.context_audio) != len(args.context_text):
        raise ValueError("--context-audio and --context-text come in pairs: "
                         f"got {len(args.context_audio)} audio and {len(args.context_text)} text")
    if args.context_speaker and len(args.context_speaker) != len(args.context_audio):
        raise ValueError("give --context-speaker once per context turn, or not at all")
    if args.output and not Path(args.output).expanduser().resolve().parent.is_dir():
        raise ValueError(f"--output: the folder of {args.output} does not exist")
    speakers = args.context_speaker or [args.speaker] * len(args.context_audio)
    turns = []
    for path, text, speaker in zip(args.context_audio, args.context_text, speakers):
        audio, rate = read_audio(path)
        turns.append(ContextTurn(path, text, speaker, audio, rate, Path(path).read_bytes()))
    if args.chat and args.server is None:
        from csm_streaming.chat.llm import LLMConfig, check

        args.llm_config = LLMConfig.from_env(args.llm, model=args.llm_model)
        check(args.llm_config)  # the key, the endpoint, the model: before the model loads
    if args.voice is not None and args.server is None:
        from csm_streaming.engine.voices import VoiceLibrary

        VoiceLibrary.load(args.voices_dir).get(args.voice)  # the files are there and readable
    if args.server is None:
        from csm_streaming.engine.config import StreamingConfig
        from csm_streaming.model.quantize import check_mode

        check_mode(args.quantize, args.device)
        StreamingConfig(chunk_size_ms=args.chunk_size, first_chunk_ms=args.first_chunk,
                        frame_batch_size=args.decode_frames)
    else:
        from csm_streaming.client.remote import ws_url

        ws_url(args.server)
    return turns


# -- local, remote, chat ---------------------------------------------------------------------------


def load_local(args):
    """The model here (the slow part, after every check passed): a StreamingGenerator."""
    from csm_streaming.engine.config import StreamingConfig
    from csm_streaming.engine.loader import load_streaming_csm_1b

    config = StreamingConfig(chunk_size_ms=args.chunk_size, first_chunk_ms=args.first_chunk,
                             frame_batch_size=args.decode_frames, **config_arguments(args))
    load = load_arguments(args)
    model = load["model"]
    t = time.perf_counter()
    sg = load_streaming_csm_1b(config=config, allow_cpu_fallback=not args.no_cpu_fallback,
                               normalize=not args.no_normalize, **load)
    warm = f" (of which warm-up, compile, CUDA graphs: {sg.warmup_s:.1f} s)" if sg.warmup_s else ""
    dtype = str(next(sg.generator.model.parameters()).dtype).removeprefix("torch.")
    print(f"loaded {model} on {sg.device} ({dtype}) in {time.perf_counter() - t:.1f} s{warm}",
          file=sys.stderr)
    voice = None
    if args.voice is not None:
        from csm_streaming.engine.voices import VoiceLibrary

        voice = VoiceLibrary.load(args.voices_dir, sg.generator).get(args.voice)  # encoded once
    return sg, voice


def run_local(args, turns: list[ContextTurn]) -> int:
    from csm_streaming.request import EmptyOutputError, Segment

    sg, voice = load_local(args)
    context = ([voice.segment] if voice else []) + [Segment(t.speaker, t.text, t.audio, t.rate)
                                                     for t in turns]
    speaker = voice.speaker if voice else args.speaker
    try:
        req = sg.generator.complete(GenerationRequest(args.text, speaker, context,
                                                      args.sampling))
        player = open_player(sg.sample_rate) if args.play_audio else None
        stream = sg.stream(req, None)
    except ValueError as e:  # a text too long for the window is known once the model is there
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    expected = min(req.max_frames * 0.08, 0.08 * len(args.text))
    try:
        chunks, interrupted = show_stream(stream, lambda: sg.metrics, args, player, expected)
    except (EmptyOutputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return finish(args, chunks, sg.metrics, player, sg.sample_rate, interrupted)


def run_remote(args, turns: list[ContextTurn]) -> int:
    from csm_streaming.audio import SAMPLE_RATE
    from csm_streaming.client.remote import (
        RemoteError,
        check_server,
        request_message,
        stream_from_server,
    )
    from csm_streaming.metrics import StreamMetrics

    try:
        health = check_server(args.server)
        player = open_player(SAMPLE_RATE) if args.play_audio else None
    except (RemoteError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"server {args.server}: {health.get('device')}, {health.get('slots')} stream slots",
          file=sys.stderr)
    metrics = StreamMetrics(device=f"{health.get('device')} (remote)")
    message = request_message(args.text, args.speaker, args.voice, args.sampling,
                              [(t.speaker, t.text, t.raw) for t in turns])
    stream = stream_from_server(args.server, message, metrics, token=args.token)
    try:
        chunks, interrupted = show_stream(stream, lambda: metrics, args, player,
                                          0.08 * len(args.text))
    except RemoteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return finish(args, chunks, metrics, player, SAMPLE_RATE, interrupted)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # Warnings (watermark off, context dropped) as one plain line, not a source listing.
    warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
    from csm_streaming.audio import SAMPLE_RATE
    from csm_streaming.chat.llm import LLMError

    if not args.output and not args.play_audio:  # never thrown away unasked: finish says where
        args.output = DEFAULT_OUTPUT
    try:
        turns = check_args(args)
        if args.play_audio:  # the sound card is there: checked now, opened when needed
            open_player(SAMPLE_RATE).close()
    except (ValueError, OSError, LLMError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.server is not None:  # a remote server: nothing here imports torch
        return chat_console(args) if args.chat else run_remote(args, turns)
    from csm_streaming.model.hub import CheckpointError
    from csm_streaming.model.watermark import WatermarkError

    try:
        return chat_console(args) if args.chat else run_local(args, turns)
    except (CheckpointError, WatermarkError, FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)  # loading failed: the model, a device, a voice
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())


def chat_console(args) -> int:
    from csm_streaming.chat.console import run_chat

    return run_chat(args, *(load_local(args) if args.server is None else (None, None)))


def server_main(argv=None) -> int:
    """csm-server: the server needs the engine extra; a client-only install says so."""
    import importlib.util

    missing = [m for m in ("torch", "fastapi", "uvicorn") if sys.modules.get(m, 0) is None
               or m not in sys.modules and importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: csm-server runs the model and needs {', '.join(missing)}: install the "
              "engine (pip install 'csm-streaming[engine]', or bash setup.sh in a clone). This "
              "install is the client: csm-stream --server URL listens to a running server.",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    from csm_streaming.server.app import main as serve

    return serve(argv)
