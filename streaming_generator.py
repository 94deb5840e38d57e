"""Face of the streaming API for a clone: the code lives in csm_streaming.engine.streaming;
package code never imports this file."""

from csm_streaming.engine.config import StreamingConfig  # noqa: F401
from csm_streaming.engine.streaming import (  # noqa: F401
    StreamingGenerator,
    StreamRequest,
    load_streaming_csm_1b,
)
