"""Offline tiny Voxtral in Mistral's native format, the one vLLM serves.

`build_tiny_mistral(DIR)` writes `params.json` + `consolidated.safetensors` + `tekken.json`
(and no `config.json`: vLLM would then read the folder as a Hugging Face checkpoint). The
tokenizer is the same generated `tekken.json` as the transformers-format tiny model.

Sizes are the smallest vLLM's CPU backend runs: its attention kernels support head sizes of
32 and up (16 crashes the engine at the first request), so text dim 64 = 2 heads x 32 with 1
KV head, and the audio encoder likewise.

With `script="some words"` greedy decoding answers exactly that text then EOS, whatever the
audio and prompt. vLLM has no `sequence_bias`, so the script lives in the weights: every
decoder layer's output projections are zero, which leaves the last position's hidden state
equal to its token's embedding; the chain tokens (the two answer-start tokens, the script's
tokens) get orthonormal embeddings, and the output matrix maps each chain token's embedding
to its successor's logit. That is a successor map, so a script in which one token is followed
by two different tokens is refused. Without a script the weights are random (seeded).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .tiny import (
    ANSWER_STARTS,
    DEFAULT_BPE_RANKS,
    EOS_ID,
    NUM_SPECIAL,
    SEED,
    _tekken_json,
)

logger = logging.getLogger(__name__)

TEXT_DIM, TEXT_HEADS, TEXT_KV_HEADS, HEAD_DIM = 64, 2, 1, 32
TEXT_HIDDEN, TEXT_LAYERS = 128, 2
ENC_DIM, ENC_HEADS, ENC_HIDDEN, ENC_LAYERS = 64, 2, 256, 2
DOWNSAMPLE = 4  # encoder frames stacked per audio token (12.5 Hz from 50 Hz)
SCRIPT_LOGIT = 30.0  # logit of the scripted successor; every other logit is 0


def params_json(vocab_size: int) -> dict[str, Any]:
    """The model's `params.json` (what vLLM's `--config-format mistral` reads)."""
    return {
        "dim": TEXT_DIM,
        "n_layers": TEXT_LAYERS,
        "head_dim": HEAD_DIM,
        "hidden_dim": TEXT_HIDDEN,
        "n_heads": TEXT_HEADS,
        "n_kv_heads": TEXT_KV_HEADS,
        "rope_theta": 1_000_000.0,
        "norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_seq_len": 8192,
        "max_position_embeddings": 8192,
        "tied_embeddings": False,
        "multimodal": {
            "whisper_model_args": {
                "encoder_args": {
                    "audio_encoding_args": {
                        "sampling_rate": 16000,
                        "num_mel_bins": 128,
                        "hop_length": 160,
                        "window_size": 400,
                    },
                    "dim": ENC_DIM,
                    "n_layers": ENC_LAYERS,
                    "head_dim": ENC_DIM // ENC_HEADS,
                    "hidden_dim": ENC_HIDDEN,
                    "n_heads": ENC_HEADS,
                    "vocab_size": vocab_size,
                    "max_source_positions": 1500,
                },
                "downsample_args": {"downsample_factor": DOWNSAMPLE},
            }
        },
    }


def successor_map(script_ids: list[int], repeat: bool = False) -> dict[int, int]:
    """token -> the token greedy decoding must emit after it: answer start -> script -> EOS
    (`repeat`: -> the script again, forever)."""
    successors: dict[int, int] = {}
    for start in ANSWER_STARTS:
        seq = [start, *script_ids, script_ids[0] if repeat else EOS_ID]
        for token, nxt in zip(seq, seq[1:], strict=False):
            if successors.get(token, nxt) != nxt:
                raise ValueError(
                    f"--script: token {token} is followed by both {successors[token]} and {nxt}; "
                    "the Mistral-format tiny model can only follow each token with one other "
                    "(rephrase so that no word piece repeats)"
                )
            successors[token] = nxt
    return successors


def build_tiny_mistral(
    out_dir: Path, script: str | None = None, n_bpe: int = DEFAULT_BPE_RANKS, repeat: bool = False
) -> Path:
    """Write a tiny Voxtral in Mistral format into `out_dir` (deterministic); return it.

    `repeat=True`: the script never ends (the answer stops at the request's max tokens), for
    tests that need a turn to stay in flight for a while.
    """
    import torch
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / "config.json"
    if stale.exists():  # vLLM would read the folder as a transformers checkpoint
        stale.unlink()
    tekken = out_dir / "tekken.json"
    tekken.write_text(json.dumps(_tekken_json(n_bpe)), encoding="utf-8")
    vocab_size = n_bpe + NUM_SPECIAL
    (out_dir / "params.json").write_text(
        json.dumps(params_json(vocab_size), indent=2), encoding="utf-8"
    )

    generator = torch.Generator().manual_seed(SEED)

    def rand(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    weights: dict[str, torch.Tensor] = {}
    enc = "mm_whisper_embeddings.whisper_encoder"
    weights[f"{enc}.conv_layers.0.weight"] = rand(ENC_DIM, 128, 3)
    weights[f"{enc}.conv_layers.0.bias"] = torch.zeros(ENC_DIM)
    weights[f"{enc}.conv_layers.1.weight"] = rand(ENC_DIM, ENC_DIM, 3)
    weights[f"{enc}.conv_layers.1.bias"] = torch.zeros(ENC_DIM)
    for i in range(ENC_LAYERS):
        layer = f"{enc}.transformer.layers.{i}"
        for w in ("wq", "wk", "wv", "wo"):
            weights[f"{layer}.attention.{w}.weight"] = rand(ENC_DIM, ENC_DIM)
            if w != "wk":  # Whisper's key projection has no bias
                weights[f"{layer}.attention.{w}.bias"] = torch.zeros(ENC_DIM)
        weights[f"{layer}.feed_forward.w1.weight"] = rand(ENC_HIDDEN, ENC_DIM)
        weights[f"{layer}.feed_forward.w1.bias"] = torch.zeros(ENC_HIDDEN)
        weights[f"{layer}.feed_forward.w2.weight"] = rand(ENC_DIM, ENC_HIDDEN)
        weights[f"{layer}.feed_forward.w2.bias"] = torch.zeros(ENC_DIM)
        for norm in ("attention_norm", "ffn_norm"):
            weights[f"{layer}.{norm}.weight"] = torch.ones(ENC_DIM)
            weights[f"{layer}.{norm}.bias"] = torch.zeros(ENC_DIM)
    weights[f"{enc}.transformer.norm.weight"] = torch.ones(ENC_DIM)
    weights[f"{enc}.transformer.norm.bias"] = torch.zeros(ENC_DIM)
    proj = "mm_whisper_embeddings.audio_language_projection"
    weights[f"{proj}.0.weight"] = rand(TEXT_DIM, ENC_DIM * DOWNSAMPLE)
    weights[f"{proj}.2.weight"] = rand(TEXT_DIM, TEXT_DIM)

    embeddings = torch.randn(vocab_size, TEXT_DIM, generator=generator)
    output = rand(vocab_size, TEXT_DIM, scale=1.0)
    zero_layer_outputs = script is not None
    if script is not None:
        ids = list(Tekkenizer.from_file(str(tekken)).encode(script, bos=False, eos=False))
        if not ids:
            raise ValueError("--script needs at least one non-space character")
        successors = successor_map(ids, repeat)
        chain = sorted(successors)
        if len(chain) > TEXT_DIM:
            raise ValueError(
                f"--script is {len(ids)} tokens; the Mistral-format tiny model scripts at "
                f"most {TEXT_DIM - len(ANSWER_STARTS)} distinct tokens"
            )
        # Orthonormal embeddings for the chain: logit(successor) = SCRIPT_LOGIT, others 0.
        basis, _ = torch.linalg.qr(torch.randn(TEXT_DIM, TEXT_DIM, generator=generator))
        output = torch.zeros(vocab_size, TEXT_DIM)
        for k, token in enumerate(chain):
            # RMS norm scales a unit vector by sqrt(dim); undo it so the logit is exact.
            embeddings[token] = basis[:, k]
            output[successors[token]] += basis[:, k] * SCRIPT_LOGIT / TEXT_DIM**0.5
    weights["tok_embeddings.weight"] = embeddings
    weights["norm.weight"] = torch.ones(TEXT_DIM)
    weights["output.weight"] = output
    q_dim, kv_dim = TEXT_HEADS * HEAD_DIM, TEXT_KV_HEADS * HEAD_DIM
    for i in range(TEXT_LAYERS):
        layer = f"layers.{i}"
        weights[f"{layer}.attention.wq.weight"] = rand(q_dim, TEXT_DIM)
        weights[f"{layer}.attention.wk.weight"] = rand(kv_dim, TEXT_DIM)
        weights[f"{layer}.attention.wv.weight"] = rand(kv_dim, TEXT_DIM)
        wo = rand(TEXT_DIM, q_dim)
        weights[f"{layer}.attention.wo.weight"] = wo * 0 if zero_layer_outputs else wo
        weights[f"{layer}.feed_forward.w1.weight"] = rand(TEXT_HIDDEN, TEXT_DIM)
        w2 = rand(TEXT_DIM, TEXT_HIDDEN)
        weights[f"{layer}.feed_forward.w2.weight"] = w2 * 0 if zero_layer_outputs else w2
        weights[f"{layer}.feed_forward.w3.weight"] = rand(TEXT_HIDDEN, TEXT_DIM)
        weights[f"{layer}.attention_norm.weight"] = torch.ones(TEXT_DIM)
        weights[f"{layer}.ffn_norm.weight"] = torch.ones(TEXT_DIM)
    save_file(
        {k: v.contiguous() for k, v in weights.items()}, str(out_dir / "consolidated.safetensors")
    )
    logger.info("wrote tiny Mistral-format Voxtral to %s (script=%r)", out_dir, script)
    return out_dir
