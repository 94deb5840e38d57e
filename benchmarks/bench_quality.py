"""Quality of real weights: word error rate of a speech recogniser on fixed sentences, and the
share of clips that run to the length cap (speech that never ends).

Each sentence is spoken three ways with the same seed: by the plain reference loop
(`Generator.generate`), by the streaming engine (`generate_streaming`, what the product runs:
its word error rate is `mean_wer`, its clips count the caps) and by the streaming engine over
int8 weights. The acceptance bounds the streaming engine's rate by 1.1x the plain loop's and
int8's by 1.2x the unquantized one's (a rate is taken as at least 1%, one word in a hundred,
when it is the divisor: ten sentences both heard perfectly are a ratio of 1).

Word times: on the streaming engine's clips, the voice-agent sockets' word times (each clip one
phrase) against the word timestamps of the recogniser (Whisper's, an independent aligner): the
mean distance of the words' starts, for the estimate (the phrase shared over its words) and
for the CTC aligner of `csm-server --word-aligner` (engine/word_align.py), words matched by
their spelling (`start_error_ms`).

Needs real weights (random ones speak noise: the check says so and stops) and, for the word
error rate, a Whisper model from the hub (transformers' pipeline); where the recogniser cannot
be fetched it says so and reports the length caps alone. deploy_vast.py's acceptance runs it
when the model is a real checkpoint. Saves benchmarks/results/quality_<device>.json.
"""

from __future__ import annotations

import argparse
import re
import sys
from difflib import SequenceMatcher

import numpy as np
import torch

from common import device_name, save_json
from csm_streaming.engine.word_align import DEFAULT_ALIGNER
from csm_streaming.options import HelpFormatter

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "It is a beautiful day to take a walk along the river.",
    "The meeting has been moved to Thursday afternoon at three.",
    "I would like a cup of coffee with a little milk, please.",
    "Streaming speech starts to play before the whole sentence is ready.",
    "She sells sea shells by the sea shore.",
    "Turn left at the second light and the station is on your right.",
    "We will need about twenty minutes to finish the last chapter.",
    "Thank you for waiting, your order is ready now.",
]
MAX_MS = 10_000  # a sentence above takes 2-5 s: reaching this means the speech did not end


def normalise(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, by edit distance."""
    ref, hyp = normalise(reference), normalise(hypothesis)
    if not ref:
        return float(bool(hyp))
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / len(ref)


def start_error_ms(words: list[str], starts: list[float], heard: list[tuple[str, float]]
                   ) -> tuple[float | None, int]:
    """The mean distance (ms) between our words' starts and the recogniser's (`heard`: word,
    start), over the words both have, paired in order by their spelling (normalise); and how
    many were paired. None where none were."""
    ours = [" ".join(normalise(w)) for w in words]
    theirs = [" ".join(normalise(w)) for w, _ in heard]
    pairs = [(block.a + k, block.b + k)
             for block in SequenceMatcher(None, ours, theirs, autojunk=False).get_matching_blocks()
             for k in range(block.size) if ours[block.a + k]]
    if not pairs:
        return None, 0
    return 1000 * float(np.mean([abs(starts[i] - heard[j][1]) for i, j in pairs])), len(pairs)


def load_recogniser(name: str, device):
    """transformers' ASR pipeline, or (None, why) when it cannot be had here."""
    try:
        from transformers import pipeline

        return pipeline("automatic-speech-recognition", model=name, device=device), None
    except Exception as e:  # offline, gated, missing: the check goes on without it
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="unsloth/csm-1b", help="real weights: a repo or folder")
    p.add_argument("--mimi", default=None, help="Mimi weights (None: Kyutai's release)")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--recogniser", default="openai/whisper-small.en", help="a Whisper model")
    p.add_argument("--word-aligner", default=DEFAULT_ALIGNER,
                   help="the CTC model whose word times are measured against the recogniser's")
    p.add_argument("--sentences", type=int, default=len(SENTENCES), help="how many to speak")
    p.add_argument("--max-audio-ms", type=int, default=MAX_MS,
                   help="the length cap (a sentence here takes 2-5 s: reaching it means the "
                        "speech did not end)")
    p.add_argument("--no-watermark", action="store_true", help="skip the (inaudible) mark")
    p.add_argument("--out-dir", default=None, help="where the JSON goes")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from csm_streaming.engine.config import StreamingConfig
    from csm_streaming.engine.frontend import StreamingGenerator
    from csm_streaming.engine.loader import load_csm_1b, load_streaming_csm_1b, pick_device
    from csm_streaming.model.hub import is_random_model

    device = pick_device(args.device)
    payload = {"model": args.model, "recogniser": args.recogniser,
               "max_audio_ms": args.max_audio_ms}
    if is_random_model(args.model):
        payload["skipped"] = "random weights speak noise: the quality check needs real weights"
        print(f"quality: {payload['skipped']}")
        save_json("quality", device, payload, args.out_dir)
        return 0
    from csm_streaming.model.hub import CheckpointError
    from csm_streaming.model.watermark import WatermarkError

    try:
        gen = load_csm_1b(device=str(device), model=args.model, mimi=args.mimi,
                          watermark=not args.no_watermark)
    except (CheckpointError, WatermarkError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    asr, why = load_recogniser(args.recogniser, device)
    if asr is None:
        payload["recogniser_unavailable"] = why
        print(f"quality: the recogniser {args.recogniser} could not be loaded ({why}): the word "
              "error rate is not measured, the length caps are")
    speakers = {"plain": lambda text, i: gen.generate(
        text, 0, max_audio_length_ms=args.max_audio_ms, seed=i)}
    streaming = StreamingGenerator(gen, StreamingConfig())
    speakers["streaming"] = streamed(streaming, args.max_audio_ms)
    try:
        int8 = load_streaming_csm_1b(str(device), model=args.model, mimi=args.mimi,
                                     quantize="int8", watermark=not args.no_watermark)
        speakers["int8"] = streamed(int8, args.max_audio_ms)
    except (RuntimeError, ValueError) as e:  # its row then says why (not measured)
        payload["int8_unavailable"] = f"{type(e).__name__}: {e}"
    aligner = load_aligner(args.word_aligner, device, payload) if asr is not None else None
    for path, speak in speakers.items():
        timed = aligner if path == "streaming" else False  # False: no word times measured
        rows = [hear(asr, text, speak(text, i), args.max_audio_ms, timed)
                for i, text in enumerate(SENTENCES[:args.sentences])]
        payload.update(summary(path, rows))
    if "mean_wer" in payload and "plain_mean_wer" in payload:
        payload["wer_streaming_vs_plain"] = payload["mean_wer"] / max(
            payload["plain_mean_wer"], MIN_WER)
    if "mean_wer" in payload and "int8_mean_wer" in payload:
        payload["wer_int8_vs_bf16"] = payload["int8_mean_wer"] / max(payload["mean_wer"], MIN_WER)
    print(f"quality on {device_name(device)}: {payload['share_at_cap']:.0%} of clips at the cap"
          + (f", mean WER {payload['mean_wer']:.3f}" if "mean_wer" in payload else ""))
    save_json("quality", device, payload, args.out_dir)
    return 0


MIN_WER = 0.01  # a rate divided by is taken as at least this (one word in a hundred)


def streamed(sg, max_ms: int):
    """A speaker function over a StreamingGenerator: the whole of a streamed sentence."""
    def speak(text: str, seed: int) -> torch.Tensor:
        return torch.cat(list(sg.generate_streaming(text, 0, max_audio_length_ms=max_ms,
                                                    seed=seed)))
    return speak


def load_aligner(name: str, device, payload: dict):
    """The word aligner whose times are measured, or None (why: in the payload)."""
    from csm_streaming.engine.word_align import CtcAligner

    try:
        return CtcAligner.load(name, device)
    except RuntimeError as e:
        payload["aligner_unavailable"] = str(e)
        print(f"quality: {e}")
        return None


def hear(asr, text: str, audio: torch.Tensor, max_ms: int, timed=False) -> dict:
    """One clip: its length, whether it ran to the cap and, with a recogniser, what it heard.
    timed (not False): our word times against the recogniser's, the estimate's and, where
    `timed` is an aligner, the aligner's."""
    row = {"text": text, "audio_s": audio.numel() / 24_000, "at_cap": audio.numel() >= max_ms * 24}
    if asr is not None:
        import soxr

        rate = asr.feature_extractor.sampling_rate  # resampled here: the pipeline would need
        clip = soxr.resample(audio.float().cpu().numpy(), 24_000, rate)  # torchaudio for it
        said = asr({"raw": clip, "sampling_rate": rate},
                   **({"return_timestamps": "word"} if timed is not False else {}))
        row.update(heard=said["text"], wer=word_error_rate(text, said["text"]))
        if timed is not False:
            row.update(word_time_errors(text, audio, said["chunks"], timed))
    print(f"  {row['audio_s']:.1f} s{' (cap)' if row['at_cap'] else ''}"
          + (f", WER {row['wer']:.2f}: {row['heard']!r}" if "wer" in row else "")
          + "".join(f", {k} {v:.0f} ms" for k, v in row.items()
                    if k.startswith("word_start_error") and v is not None), flush=True)
    return row


def word_time_errors(text: str, audio: torch.Tensor, chunks: list[dict], aligner) -> dict:
    """Our word times for a one-phrase clip against the recogniser's (`chunks`: its words with
    (start, end)): the mean distance of the starts, estimated and (with an aligner) aligned."""
    from csm_streaming.server.speech_contexts import aligned_word_times, word_times

    heard = [(c["text"], c["timestamp"][0]) for c in chunks if c["timestamp"][0] is not None]
    seconds = audio.numel() / 24_000
    ours = {"estimate": word_times(text, 0.0, seconds)}
    if aligner is not None:
        ours["aligned"] = aligned_word_times(aligner, text, audio.float().cpu().numpy(), 0.0,
                                             seconds)
    row = {"heard_words": [[w, t] for w, t in heard]}
    for how, times in ours.items():
        row[f"word_start_error_ms_{how}"], row[f"words_paired_{how}"] = start_error_ms(
            times.words, times.start, heard)
    return row


def summary(path: str, rows: list[dict]) -> dict:
    """A path's figures: the streaming engine's under the plain names (the product's), the
    others under their path's prefix."""
    prefix = "" if path == "streaming" else f"{path}_"
    out = {f"{prefix}rows": rows,
           f"{prefix}share_at_cap": sum(r["at_cap"] for r in rows) / len(rows)}
    if rows and "wer" in rows[0]:
        out[f"{prefix}mean_wer"] = sum(r["wer"] for r in rows) / len(rows)
    for how in ("estimate", "aligned"):  # the words' start error, over the clips that have one
        errors = [r[f"word_start_error_ms_{how}"] for r in rows
                  if r.get(f"word_start_error_ms_{how}") is not None]
        if errors:
            out[f"{prefix}word_start_error_ms_{how}"] = float(np.mean(errors))
    print(f"{path}: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items() if not k.endswith("rows")))
    return out


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
