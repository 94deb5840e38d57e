"""The terminal side of the command line, torch-free: the sound card, the dashboard while a
stream plays, and the audio written at the end (cli.py's local, remote and chat runs share it).
"""

from __future__ import annotations

import sys
from pathlib import Path

from csm_streaming.audio import SAMPLE_RATE

EXIT_BAD_INPUT = 2


def open_player(sample_rate: int):
    """The sound card, opened now: no device is an error before any loading."""
    from csm_streaming.client.playback import AudioPlayer

    try:
        import sounddevice as sd

        sd.query_devices(kind="output")
        return AudioPlayer(sample_rate).start()
    except Exception as e:  # no PortAudio, no output device
        raise ValueError(f"cannot open the audio output ({e}); run without --play-audio or with "
                         "--output FILE.wav") from None


# -- the shared part: play, show, save ------------------------------------------------------------


def show_stream(chunks, metrics_of, args, player, expected_s: float, chat_of=None):
    """Consume 24 kHz chunks (tensors or arrays) with the dashboard and, when playing, the
    sound card. chat_of: a chat's metrics (then the dashboard goes to stderr: stdout has the
    reply's text). Returns (list of chunks, interrupted)."""
    from csm_streaming.client.dashboard import Dashboard

    file = None if chat_of is None else sys.stderr
    chat_of = chat_of or (lambda: None)
    out, interrupted = [], False
    with Dashboard(enabled=True, force_terminal=False if args.no_dashboard else None,
                   file=file) as dash:
        def show(status):
            dash.update(snapshot(metrics_of(), player, status, chat_of()),
                        force=status != "generating")

        try:
            if player is not None:
                from csm_streaming.client.playback import play_stream

                chunks = play_stream(chunks, SAMPLE_RATE, rtf_hint=0.5, expected_total_s=expected_s,
                                     player=player, on_chunk=lambda _: show("generating"))
            for chunk in chunks:
                out.append(chunk)
                show("generating")
            show("done")
        except KeyboardInterrupt:
            interrupted = True
            show("interrupted")
        finally:
            if player is not None:
                player.close()
    return out, interrupted


def snapshot(metrics, player, status: str, chat=None):
    """What the dashboard shows: the stream's numbers, the player's buffer, the LLM's wait."""
    from csm_streaming.client.dashboard import Snapshot

    stats = player.stats() if player is not None else None
    events = [str(e) for e in metrics.events]
    if stats is not None and not stats.started and not stats.finished:
        status = f"buffering {stats.buffered_ms:.0f} / {stats.prebuffer_ms:.0f} ms before playback"
        if metrics.audio_s and metrics.rtf >= 1:
            events.append(f"slower than real time (RTF {metrics.rtf:.2f}): buffering "
                          f"{stats.prebuffer_ms / 1000:.1f} s so playback will not stall")
    llm_s = None if chat is None else chat.llm_first_piece_s
    llm_ms = None if llm_s is None else llm_s * 1e3
    return Snapshot(device=metrics.device, status=status, rtf_now=metrics.rtf_now, rtf=metrics.rtf,
                    ttfa_ms=None if metrics.first_audio_s is None else metrics.first_audio_s * 1e3,
                    chunks=metrics.chunks, chunk_gen_ms=list(metrics.chunk_gen_ms),
                    frames=metrics.frames, frames_per_s=metrics.frames_per_s,
                    audio_s=metrics.audio_s,
                    buffer_ms=None if stats is None else stats.buffered_ms,
                    prebuffer_ms=None if stats is None else stats.prebuffer_ms,
                    underruns=0 if stats is None else stats.underruns,
                    memory_mb=metrics.peak_memory_mb, events=events, llm_ms=llm_ms,
                    llm_share=None if chat is None else chat.llm_wait_share)


def save_chunks(path, chunks, sample_rate: int):
    """The chunks as one array, written to `path` when there is one."""
    import numpy as np

    from csm_streaming.audio import save_audio

    audio = np.concatenate([np.asarray(c.detach().cpu() if hasattr(c, "detach") else c)
                            for c in chunks]) if chunks else np.zeros(0, dtype=np.float32)
    if path:
        save_audio(path, audio, sample_rate)
    return audio


def finish(args, chunks, metrics, player, sample_rate: int, interrupted: bool) -> int:
    audio = save_chunks(args.output, chunks, sample_rate)
    if args.output:
        print(f"wrote {audio.size / sample_rate:.2f} s to {Path(args.output).resolve()}",
              file=sys.stderr)
    if metrics is not None and metrics.audio_s:
        print(f"audio {metrics.audio_s:.2f} s, first audio {metrics.first_audio_s * 1000:.0f} ms, "
              f"RTF {metrics.rtf:.3f}, {metrics.frames_per_s:.1f} frames/s"
              + (f", underruns {player.underruns}" if player else ""), file=sys.stderr)
        if metrics.stage_s:
            print(f"stages: {metrics.stages_line()}", file=sys.stderr)
    return 130 if interrupted else 0
