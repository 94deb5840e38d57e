"""Upstream face of watermarking.py, its command line too:

    python watermarking.py --audio-path speech.wav     # does this file carry the mark?

The code lives in csm_streaming.model.watermark (the command: csm_streaming.verify_watermark);
package code never imports this file."""

from csm_streaming.model.watermark import (  # noqa: F401
    CSM_1B_GH_WATERMARK,
    load_watermarker,
    verify,
    watermark,
)
from csm_streaming.verify_watermark import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
