"""The next token of one answer, chosen the way `generate` would, with the answer's own RNG.

A batched decode step gives one row of logits per answer; each answer then goes through its
own `TokenPicker`: the logits processors `generate` builds for the same settings (the model's
`generation_config`, e.g. the tiny checkpoint's `sequence_bias`, then `min_new_tokens`,
temperature, top-p ...) applied to that answer's own token ids, then argmax or a draw from
the answer's own `torch.Generator`. So an answer's tokens depend on its prompt, its settings
and its seed, never on which other answers share the step.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ...config import SamplingSettings
from ..types import Request, sampling


class TokenPicker:
    def __init__(
        self,
        model: Any,
        request: Request,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        chat: SamplingSettings,
        extra: Sequence[LogitsProcessor] = (),
    ) -> None:
        """`prompt_ids`: (1, n) on the model's device; `extra`: processors applied after
        `generate`'s own (as `generate(logits_processor=...)` does)."""
        temperature, top_p = sampling(request, chat)
        self.do_sample = top_p is not None
        config = copy.deepcopy(model.generation_config)
        settings: dict[str, Any] = {"do_sample": self.do_sample}
        if self.do_sample:
            settings.update(temperature=temperature, top_p=top_p)
        config.update(
            **settings, max_new_tokens=max_new_tokens, min_new_tokens=request.min_new_tokens
        )
        device = prompt_ids.device
        n = prompt_ids.shape[1]
        # The same two steps `generate` takes (private helpers: transformers 5.x; the parity
        # tests against `generate` hold them to it).
        model._prepare_special_tokens(config, True, device)
        self.processors = model._get_logits_processor(
            generation_config=config,
            input_ids_seq_length=n,
            device=device,
            model_kwargs={},
            logits_processor=LogitsProcessorList(extra),
        )
        eos = config._eos_token_tensor
        self.eos: frozenset[int] = frozenset(eos.tolist()) if eos is not None else frozenset()
        self.max_new_tokens = max_new_tokens
        self._ids = torch.zeros((1, n + max_new_tokens), dtype=torch.long, device=device)
        self._ids[:, :n] = prompt_ids
        self._length = n
        self.generated = 0
        self.generator: torch.Generator | None = None
        if self.do_sample:
            self.generator = torch.Generator(device)
            if request.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(request.seed)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token (a 1-element tensor on the device) from this answer's float32
        logits row (vocab,); appends it to the answer's ids."""
        scores = self.processors(self._ids[:, : self._length], logits.unsqueeze(0))
        if self.do_sample:
            probs = torch.softmax(scores, dim=-1)
            token = torch.multinomial(probs[0], 1, generator=self.generator)
        else:
            token = torch.argmax(scores[0], dim=-1, keepdim=True)
        self._ids[0, self._length] = token[0]
        self._length += 1
        self.generated += 1
        return token

    @property
    def ids(self) -> torch.Tensor:
        """The prompt and the tokens picked so far, (n + generated,)."""
        return self._ids[0, : self._length]

    def done(self, token: int) -> bool:
        """True once `token` (the latest) ends the answer: EOS or the token budget."""
        return token in self.eos or self.generated >= self.max_new_tokens
