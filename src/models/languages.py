"""The languages a transcription request may name: ISO-639-1 codes, checked the way
mistral_common's `TranscriptionRequest` checks them (pycountry's list), so a code the model's
tokenizer would refuse is refused when it is set, not at every later turn."""

from __future__ import annotations

import pycountry


def check_language(code: str | None) -> str | None:
    """`code` if it is an ISO-639-1 language (or None); else ValueError naming it."""
    if code is not None and pycountry.languages.get(alpha_2=code) is None:
        raise ValueError(f"{code!r} is not an ISO-639-1 language code (e.g. en, fr, de)")
    return code
