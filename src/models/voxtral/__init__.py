"""The transformers engine: Voxtral loaded, compiled and warmed up, served by one worker thread."""

from .engine import ChunkStream, VoxtralEngine

__all__ = ["ChunkStream", "VoxtralEngine"]
