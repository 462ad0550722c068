"""One conversation, whatever carries it (see `core`)."""

from .core import Session, Transport

__all__ = ["Session", "Transport"]
