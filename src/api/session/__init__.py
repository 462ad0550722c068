"""One conversation, whatever carries it: `core` dispatches, `input` finds the turns,
`response` carries an answer out, `report` measures it."""

from .core import Session, Transport

__all__ = ["Session", "Transport"]
