"""Does an audio file carry the CSM watermark? The command line (`csm-watermark`; in a clone
`python watermarking.py`), beside the other commands; the watermark itself is model/watermark.py.

    csm-watermark --audio-path speech.wav      # exit 0: marked, 1: not marked, 2: error

No torch at import: the model loads once the arguments are checked.
"""

from __future__ import annotations

import argparse
import sys

from csm_streaming.options import HelpFormatter

KEY_ENV = "CSM_WATERMARK_KEY"  # as model/watermark.py reads it
SILENTCIPHER_FOLDER = "44_1_khz/73999_iteration"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Check whether an audio file carries the CSM "
                                "watermark (exit 0: it does, 1: it does not, 2: error).",
                                formatter_class=HelpFormatter)
    p.add_argument("--audio-path", "--audio_path", dest="audio_path", required=True,
                   help="audio file to check (wav, flac, ogg; any rate, mono or stereo)")
    p.add_argument("--watermark-key", "--key", dest="key", default=None,
                   help=f"five integers 0..255, comma-separated (None: ${KEY_ENV} or the public "
                        "CSM-1B key)")
    p.add_argument("--device", default="cpu", help="where silentcipher runs: cpu or cuda")
    p.add_argument("--model-dir", default=None,
                   help=f"a local copy of silentcipher's {SILENTCIPHER_FOLDER} folder (None: the "
                        "Hugging Face cache, downloading it if the hub can be reached)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from csm_streaming.audio import SAMPLE_RATE, AudioError, read_audio, to_mono_24k
    from csm_streaming.model.watermark import (
        WatermarkError,
        load_watermarker,
        resolve_key,
        verify,
    )

    try:
        key = resolve_key(args.key)
        data, sr = read_audio(args.audio_path, mono=True)
        audio = to_mono_24k(data, sr)
        model = load_watermarker(args.device, args.model_dir)
    except (FileNotFoundError, AudioError, ValueError, WatermarkError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    found = verify(model, audio, SAMPLE_RATE, key)
    print(f"{args.audio_path}: {'watermarked' if found else 'no watermark found'}")
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
