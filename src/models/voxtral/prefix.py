"""What a freed slot's KV row still holds, and how much of a new prompt it already answers.

A conversation's next turn repeats the previous prompt and answer before the new audio. When
an answer ends, its row of the KV cache keeps the keys and values of every position written
(the prompt, then each answer token fed back); `RowMemory` records what those positions
were. A new prompt that starts the same way starts its prefill after the shared part.

"The same way" is checked on what the model saw, not only the token ids: `[AUDIO]` tokens
all share one id, so the prompt's embeddings are compared where the remembered row had a
prompt (audio included), and the answer part (text the model wrote) must not stand where the
new prompt has audio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class RowMemory:
    ids: np.ndarray  # token id at each position the row holds, (length,)
    prompt_embeds: torch.Tensor  # (1, prompt length, hidden): the prompt as the model saw it

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


def shared_prefix(
    memory: RowMemory, ids: np.ndarray, embeds: torch.Tensor, audio_token_id: int
) -> int:
    """How many leading positions of a new prompt (`ids` (n,), `embeds` (1, n, hidden)) the
    remembered row already holds, exactly."""
    n = min(memory.length, ids.shape[0])
    differ = np.flatnonzero(memory.ids[:n] != ids[:n])
    shared = int(differ[0]) if differ.size else n
    prompt = min(shared, memory.prompt_embeds.shape[1])
    if prompt:
        same = (memory.prompt_embeds[0, :prompt] == embeds[0, :prompt]).all(dim=-1)
        if not bool(same.all()):
            return int(torch.nonzero(~same)[0, 0])
    audio = np.flatnonzero(ids[prompt:shared] == audio_token_id)
    return prompt + int(audio[0]) if audio.size else shared
