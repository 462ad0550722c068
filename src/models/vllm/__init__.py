"""The vLLM engine: turns streamed from one or more vLLM servers (engine.kind: vllm)."""

from .endpoints import probe_delays
from .engine import VllmEngine

__all__ = ["VllmEngine", "probe_delays"]
