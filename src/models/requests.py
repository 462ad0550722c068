"""What every engine refuses before queueing a request."""

from __future__ import annotations

from .audio import AudioInputError, validate
from .chat import chat_messages, offered_tools
from .types import EngineError, Request


def check_request(request: Request, max_utterance_s: float) -> None:
    """Raise for an unknown mode, audio the model cannot answer (`audio.validate`), or a
    chat the model cannot continue (`chat.chat_messages`)."""
    if request.mode not in ("transcribe", "chat"):
        raise EngineError("invalid_mode", f"mode must be transcribe or chat, not {request.mode!r}")
    if request.audio is not None:
        validate(request.audio, max_utterance_s)
    elif request.mode == "transcribe":
        raise AudioInputError("empty_audio", "nothing to transcribe: the request has no audio")
    if request.mode == "chat":
        chat_messages(request)  # a conversation the model cannot continue
        offered_tools(request)  # tools or a tool_choice it cannot be given
