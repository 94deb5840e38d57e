"""Upstream face of models.py: the CSM modules live in csm_streaming.model; package code never
imports this file."""

from csm_streaming.model.csm import CSM, FLAVORS, ModelArgs  # noqa: F401
from csm_streaming.model.llama import LlamaArgs  # noqa: F401
