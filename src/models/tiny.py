"""Offline tiny Voxtral checkpoints: the real architecture, random weights, generated tokenizer.

`build_tiny(DIR)` writes a folder that `VoxtralProcessor.from_pretrained` and
`VoxtralForConditionalGeneration.from_pretrained` load with no network, through exactly the
code path the real model takes. With `script="some words"` greedy decoding emits exactly that
text then EOS, whatever the audio: each token of the script gets a +100 `sequence_bias` in
`generation_config.json`, conditioned on the shortest run of preceding tokens that identifies
its position. (Arranging the weights as a successor map cannot express a token that occurs
twice with different successors, e.g. "the" in "the quick ... over the lazy".)

With `tool_call=(name, arguments_json)` a chat answer to a user turn is that function call,
written as Voxtral writes one (tokenizer v7: `[TOOL_CALLS]` then a JSON list of
`{"name", "arguments"}`, then EOS); the answer after a function's result is the script (if
any), so a whole call -> result -> answer conversation is scripted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Ranks of the special tokens Voxtral's tekken.json defines (the processor hard-codes 24).
_SPECIAL_TOKENS: dict[int, str] = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]",
    5: "[AVAILABLE_TOOLS]", 6: "[/AVAILABLE_TOOLS]", 7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]",
    9: "[TOOL_CALLS]", 10: "[IMG]", 11: "<pad>", 12: "[IMG_BREAK]", 13: "[IMG_END]",
    14: "[PREFIX]", 15: "[MIDDLE]", 16: "[SUFFIX]", 17: "[SYSTEM_PROMPT]",
    18: "[/SYSTEM_PROMPT]", 19: "[TOOL_CONTENT]", 20: "[ARGS]", 21: "[CALL_ID]",
    24: "[AUDIO]", 25: "[BEGIN_AUDIO]", 34: "[TRANSCRIBE]",
}  # fmt: skip
NUM_SPECIAL = 1000
BOS_ID, EOS_ID, PAD_ID = 1, 2, 11
END_INST_ID, AUDIO_ID, TRANSCRIBE_ID = 4, 24, 34
END_TOOL_RESULTS_ID, TOOL_CALLS_ID = 8, 9
# The last prompt token before the answer: `[TRANSCRIBE]` (transcription), `[/INST]` (chat,
# after a user turn) or `[/TOOL_RESULTS]` (chat, after a function's result).
ANSWER_STARTS = (TRANSCRIBE_ID, END_INST_ID, END_TOOL_RESULTS_ID)
SCRIPT_BIAS = 100.0
DEFAULT_BPE_RANKS = 2000
SEED = 0


def _tekken_json(n_bpe: int) -> dict[str, Any]:
    source = resources.files("mistral_common") / "data" / "tekken_240911.json"
    base = json.loads(source.read_text(encoding="utf-8"))
    # A prefix of the merge order is itself a valid byte-level BPE (ranks 0-255 are bytes).
    vocab = base["vocab"][:n_bpe]
    special = [
        {"rank": r, "token_str": _SPECIAL_TOKENS.get(r, f"<SPECIAL_{r}>"), "is_control": True}
        for r in range(NUM_SPECIAL)
    ]
    return {
        "config": {
            "pattern": base["config"]["pattern"],
            "num_vocab_tokens": n_bpe,
            "default_vocab_size": n_bpe + NUM_SPECIAL,
            "default_num_special_tokens": NUM_SPECIAL,
            "version": "v7",
        },
        "vocab": vocab,
        "special_tokens": special,
        "audio": {
            "sampling_rate": 16000,
            "frame_rate": 12.5,
            "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
            "chunk_length_s": 30.0,
            "transcription_format": "instruct",
        },
    }


def script_bias(answers: dict[int, Sequence[int]], eos_id: int = EOS_ID) -> list[list[Any]]:
    """`sequence_bias` entries that make greedy decoding emit, after each answer start token
    P in `answers`, the tokens `answers[P]` then EOS.

    Every target token is biased after the shortest context that no other position (of any
    answer) with a different next token shares. P never occurs inside an answer (it is a
    control token), so a context that reaches back to P is always unique.
    """
    seqs = [[start, *ids, eos_id] for start, ids in answers.items()]
    positions = [(s, j) for s in seqs for j in range(1, len(s))]
    entries: dict[tuple[int, ...], float] = {}
    for seq in seqs:
        for i in range(1, len(seq)):
            for length in range(1, i + 1):
                ctx = seq[i - length : i]
                clash = any(
                    other[j] != seq[i] and j >= length and other[j - length : j] == ctx
                    for other, j in positions
                )
                if not clash:
                    entries[(*ctx, seq[i])] = SCRIPT_BIAS
                    break
    return [[list(k), v] for k, v in entries.items()]


def tool_call_text(name: str, arguments: str) -> str:
    """A function call as Voxtral (tokenizer v7) writes it after `[TOOL_CALLS]`. Raises
    ValueError unless `arguments` is a JSON object."""
    try:
        args = json.loads(arguments)
    except ValueError as exc:
        raise ValueError(f"--script-tool arguments are not JSON: {exc}") from None
    if not isinstance(args, dict):
        raise ValueError(f"--script-tool arguments must be a JSON object, got {arguments!r}")
    return json.dumps([{"name": name, "arguments": args}], ensure_ascii=False)


def build_tiny(
    out_dir: Path,
    script: str | None = None,
    n_bpe: int = DEFAULT_BPE_RANKS,
    tool_call: tuple[str, str] | None = None,
) -> Path:
    """Write a tiny random Voxtral checkpoint (and processor) into `out_dir`; return it.

    `script`: the text greedy decoding answers; `tool_call` (name, arguments as JSON): the
    function call it answers a user turn with instead (see the module's docstring).
    """
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        MistralCommonBackend,
        VoxtralConfig,
        VoxtralEncoderConfig,
        VoxtralForConditionalGeneration,
        VoxtralProcessor,
        WhisperFeatureExtractor,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tekken.json").write_text(json.dumps(_tekken_json(n_bpe)), encoding="utf-8")
    tokenizer = MistralCommonBackend.from_pretrained(str(out_dir))
    vocab_size = n_bpe + NUM_SPECIAL

    audio_cfg = VoxtralEncoderConfig(
        hidden_size=64,
        intermediate_size=256,  # the projector reshapes 4 encoder frames: must be 4 x hidden
        num_hidden_layers=2,
        num_attention_heads=4,
        num_mel_bins=128,
        max_source_positions=1500,
    )
    text_cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=8192,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    config = VoxtralConfig(audio_config=audio_cfg, text_config=text_cfg, audio_token_id=AUDIO_ID)
    torch.manual_seed(SEED)
    model = VoxtralForConditionalGeneration(config).eval()

    gen: dict[str, Any] = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    answers: dict[int, Sequence[int]] = {}
    if script is not None:
        ids = tokenizer.encode(script, add_special_tokens=False)
        if not ids:
            raise ValueError("--script needs at least one non-space character")
        answers = dict.fromkeys(ANSWER_STARTS, ids)
    if tool_call is not None:
        call = tool_call_text(*tool_call)
        answers[END_INST_ID] = [TOOL_CALLS_ID, *tokenizer.encode(call, add_special_tokens=False)]
    if answers:
        gen["sequence_bias"] = script_bias(answers)
    model.generation_config = GenerationConfig(**gen)
    model.save_pretrained(str(out_dir))

    feature_extractor = WhisperFeatureExtractor(
        feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400
    )
    VoxtralProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(
        str(out_dir)
    )
    logger.info(
        "wrote tiny Voxtral checkpoint to %s (script=%r, tool_call=%r)", out_dir, script, tool_call
    )
    return out_dir
