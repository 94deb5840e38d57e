"""Face of the streaming API for a clone: the code lives in csm_streaming.engine (frontend.py:
StreamingGenerator; loader.py: load_streaming_csm_1b); package code never imports this file."""

from csm_streaming.engine.config import StreamingConfig  # noqa: F401
from csm_streaming.engine.frontend import StreamingGenerator  # noqa: F401
from csm_streaming.engine.loader import load_streaming_csm_1b  # noqa: F401
from csm_streaming.request import GenerationRequest, SamplingParams, Segment  # noqa: F401
