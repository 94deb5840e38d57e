"""`csm-stream --chat`: type a message, hear the reply while the language model writes it,
here (the model on this machine) or with a server (`--server URL`: nothing here imports torch).
"""

from __future__ import annotations

import sys

from csm_streaming.client.terminal import (
    EXIT_BAD_INPUT,
    finish,
    open_player,
    save_chunks,
    show_stream,
)


def read_messages():
    """The user's messages, a line each, until end of input or 'quit'."""
    while True:
        try:
            line = input("you> " if sys.stdin.isatty() else "")
        except EOFError:
            return
        if line.strip().lower() in ("quit", "exit"):
            return
        if line.strip():
            yield line.strip()


def run_chat(args, sg=None, voice=None) -> int:
    """Type a message, hear the reply while the LLM writes it (its text printed as it comes,
    before its audio); --output holds every reply so far, rewritten as each one ends.
    sg, voice: the model here (a StreamingGenerator) and the named voice; None with --server."""
    from csm_streaming.audio import SAMPLE_RATE
    from csm_streaming.chat.llm import LLMError
    from csm_streaming.client.remote import ChatSession, RemoteError
    from csm_streaming.metrics import StreamMetrics

    def say(piece: str):  # the reply's text on stdout, a line per piece as it comes (the
        print(f"csm> {piece.strip()}", flush=True)  # dashboard is on stderr)

    if args.server is None:
        from csm_streaming.chat.conversation import Conversation

        conv = Conversation(sg, args.llm_config, voice=voice, speaker=args.speaker,
                            sampling=args.sampling)
        print(f"talking with {args.llm_config.describe()}; an empty input or 'quit' ends",
              file=sys.stderr)
    else:
        session = ChatSession(args.server, args.token, args.voice, args.speaker, on_text=say,
                              sampling=args.sampling)
    everything, status, metrics = [], 0, None
    for message in read_messages():
        player = open_player(SAMPLE_RATE) if args.play_audio else None
        if args.server is None:
            chunks = conv.speak_reply(message, say)
            metrics_of, chat_of = (lambda: sg.metrics), (lambda: conv.metrics)
        else:
            metrics = StreamMetrics(device="remote")
            chunks = session.reply(message, metrics)
            metrics_of, chat_of = (lambda m=metrics: m), (lambda: None)
        try:
            out, interrupted = show_stream(chunks, metrics_of, args, player, 5.0, chat_of)
        except (LLMError, RemoteError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)  # the conversation goes on
            status = EXIT_BAD_INPUT
            continue
        everything += out
        save_chunks(args.output, everything, SAMPLE_RATE)  # each turn kept as soon as it ends
        if interrupted:
            return 130
    last = sg.metrics if args.server is None else metrics
    finish(args, everything, last, None, SAMPLE_RATE, False)
    return status
