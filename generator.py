"""Upstream face (Sesame's `from generator import load_csm_1b, Segment`): the code lives in
csm_streaming.engine (reference.py: Generator; loader.py: load_csm_1b); package code never
imports this file."""

from csm_streaming.audio import load_audio, save_audio  # noqa: F401
from csm_streaming.engine.loader import load_csm_1b  # noqa: F401
from csm_streaming.engine.reference import Generator  # noqa: F401
from csm_streaming.request import Segment  # noqa: F401
