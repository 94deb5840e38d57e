"""Speak text with CSM-1B while it is generated: the command-line demo (not a test file).

    python test_streaming.py --text "Hello from Sesame." --play-audio
    python test_streaming.py --model random:tiny --output out.wav      # offline, random weights
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass

EXIT_BAD_INPUT = 2


@dataclass
class ContextArg:
    audio: str
    text: str
    speaker: int


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Stream speech from CSM-1B, with a live dashboard.")
    p.add_argument("--text", default="Hello from Sesame. This is streaming speech, generated while you listen.")
    p.add_argument("--speaker", type=int, default=0)
    p.add_argument("--context-audio", action="append", default=[], metavar="FILE",
                   help="audio of an earlier turn (any rate, mono or stereo); pair with --context-text")
    p.add_argument("--context-text", action="append", default=[], metavar="TEXT",
                   help="what was said in the matching --context-audio")
    p.add_argument("--context-speaker", action="append", type=int, default=[], metavar="N",
                   help="speaker of the matching context turn (default: --speaker)")
    p.add_argument("--play-audio", action="store_true", help="play through the sound card while generating")
    p.add_argument("--chunk-size", type=int, default=320, metavar="MS", help="audio per chunk (multiple of 80)")
    p.add_argument("--first-chunk", type=int, default=160, metavar="MS", help="size of the first chunk")
    p.add_argument("--batch-size", type=int, default=2, metavar="N", help="frames per Mimi decode call")
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile the frame step")
    p.add_argument("--no-cuda-graphs", action="store_true", help="do not capture the frame step in a CUDA graph")
    p.add_argument("--output", metavar="FILE.wav", help="write exactly the streamed samples to this file")
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--topk", type=int, default=50)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-audio-ms", type=float, default=30_000)
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--model", default=None,
                   help="hub repo, local folder or file, or random:tiny / random:csm-1b (default: the ungated CSM-1B copy)")
    p.add_argument("--mimi", default=None, help="Mimi weights: a file, a repo, or 'random'")
    p.add_argument("--no-dashboard", action="store_true", help="plain progress lines instead of the live view")
    p.add_argument("--no-watermark", action="store_true", help="do not watermark the audio (please keep it on)")
    p.add_argument("--no-normalize", action="store_true", help="do not spell out numbers and symbols")
    p.add_argument("--no-cpu-fallback", action="store_true",
                   help="fail instead of falling back to the CPU when the GPU cannot be used")
    p.add_argument("--watermark-key", default=None, help="private key: five integers 0..255, comma-separated")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def parse_context(args) -> list[ContextArg]:
    if len(args.context_audio) != len(args.context_text):
        raise ValueError("--context-audio and --context-text come in pairs: "
                         f"got {len(args.context_audio)} audio and {len(args.context_text)} text")
    if args.context_speaker and len(args.context_speaker) != len(args.context_audio):
        raise ValueError("give --context-speaker once per context turn, or not at all")
    speakers = args.context_speaker or [args.speaker] * len(args.context_audio)
    return [ContextArg(a, t, s) for a, t, s in zip(args.context_audio, args.context_text, speakers)]


def snapshot(metrics, player, status: str):
    from dashboard import Snapshot

    stats = player.stats() if player is not None else None
    events = list(metrics.events)
    if stats is not None and not stats.started and not stats.finished:
        status = f"buffering {stats.buffered_ms:.0f} / {stats.prebuffer_ms:.0f} ms before playback"
        if metrics.audio_s and metrics.rtf >= 1:
            events.append(f"slower than real time (RTF {metrics.rtf:.2f}): buffering "
                          f"{stats.prebuffer_ms / 1000:.1f} s so playback will not stall")
    return Snapshot(device=metrics.device, status=status, rtf_now=metrics.rtf_now, rtf=metrics.rtf,
                    ttfa_ms=None if metrics.first_audio_s is None else metrics.first_audio_s * 1000,
                    chunks=metrics.chunks, chunk_gen_ms=list(metrics.chunk_gen_ms),
                    frames=metrics.frames, frames_per_s=metrics.frames_per_s, audio_s=metrics.audio_s,
                    buffer_ms=None if stats is None else stats.buffered_ms,
                    prebuffer_ms=None if stats is None else stats.prebuffer_ms,
                    underruns=0 if stats is None else stats.underruns,
                    memory_mb=metrics.peak_memory_mb, events=events)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        context_args = parse_context(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    import torch

    from audio import load_audio, save_audio
    from checkpoints import DEFAULT_REPO, CheckpointError
    from config import StreamingConfig
    from request import Segment
    from streaming_generator import load_streaming_csm_1b
    from watermarking import WatermarkError

    try:
        config = StreamingConfig(chunk_size_ms=args.chunk_size, first_chunk_ms=args.first_chunk,
                                 frame_batch_size=args.batch_size,
                                 enable_compilation=not args.no_compile,
                                 enable_cuda_graphs=not args.no_cuda_graphs)
        context = []
        for c in context_args:
            audio, sr = load_audio(c.audio)
            context.append(Segment(c.speaker, c.text, audio, sr))
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    model = args.model or DEFAULT_REPO
    t_load = time.perf_counter()
    try:
        sg = load_streaming_csm_1b(device=args.device, config=config, model=model, mimi=args.mimi,
                                   watermark=not args.no_watermark, watermark_key=args.watermark_key,
                                   allow_cpu_fallback=not args.no_cpu_fallback,
                                   normalize=not args.no_normalize)
    except (CheckpointError, WatermarkError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as e:  # a device that cannot be used
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    warm = f" (of which warm-up, compile and CUDA graphs: {sg.warmup_s:.1f} s)" if sg.warmup_s else ""
    print(f"loaded {model} on {sg.device} in {time.perf_counter() - t_load:.1f} s{warm}", file=sys.stderr)

    from dashboard import Dashboard

    player = None
    if args.play_audio:
        from playback import AudioPlayer

        try:
            player = AudioPlayer(sg.sample_rate).start()
        except Exception as e:  # no PortAudio, no output device
            print(f"error: cannot open the audio output ({e}); run without --play-audio "
                  "or with --output FILE.wav", file=sys.stderr)
            return EXIT_BAD_INPUT

    chunks = []
    try:
        stream = sg.generate_streaming(args.text, args.speaker, context, args.max_audio_ms,
                                       args.temperature, args.topk, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        if player is not None:
            player.close()
        return EXIT_BAD_INPUT
    from request import EmptyOutputError

    interrupted = False
    with Dashboard(enabled=True, force_terminal=False if args.no_dashboard else None) as dash:
        try:
            if player is not None:
                from playback import play_stream

                stream = play_stream(stream, sg.sample_rate, rtf_hint=config.rtf_target,
                                     expected_total_s=min(args.max_audio_ms / 1000, 0.08 * len(args.text)),
                                     player=player,
                                     on_chunk=lambda _: dash.update(snapshot(sg.metrics, player, "playing")))
            for chunk in stream:
                chunks.append(chunk)
                dash.update(snapshot(sg.metrics, player, "generating"))
            dash.update(snapshot(sg.metrics, player, "done"), force=True)
        except KeyboardInterrupt:
            interrupted = True
            dash.update(snapshot(sg.metrics, player, "interrupted"), force=True)
        except (EmptyOutputError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        finally:
            if player is not None:
                player.close()
    audio = torch.cat(chunks) if chunks else torch.zeros(0)
    if args.output:
        save_audio(args.output, audio, sg.sample_rate)
        print(f"wrote {audio.numel() / sg.sample_rate:.2f} s to {args.output}", file=sys.stderr)
    m = sg.metrics
    if m is not None and m.audio_s:
        print(f"audio {m.audio_s:.2f} s, first audio {m.first_audio_s * 1000:.0f} ms, RTF {m.rtf:.3f}, "
              f"{m.frames_per_s:.1f} frames/s" + (f", underruns {player.underruns}" if player else ""),
              file=sys.stderr)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
