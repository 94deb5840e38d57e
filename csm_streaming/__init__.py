"""Real-time streaming speech for Sesame's CSM-1B. Importing this loads nothing: the engine
(torch) is in csm_streaming.engine, the torch-free client in csm_streaming.client."""

__version__ = "0.3.0"
