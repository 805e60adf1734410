"""A tiny random T5 encoder with an offline word-level tokenizer: the embedded default and the tests' encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5: pad 0, EOS 1


def build_word_tokenizer(words: Sequence[str], max_length: int = 128):  # -> PreTrainedTokenizerFast
    """Lower-cased word-level tokenizer (unknown words -> <unk>) that appends EOS, pads with id 0."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL, *sorted(set(words) - set(SPECIAL))])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def build_tiny_t5(
    path: str | Path,
    words: Sequence[str],
    seed: int = 0,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int = 128,
) -> Path:
    """Write a seeded random ``T5EncoderModel`` (gated-SiLU, as Flan-T5/UL2) and its tokenizer with
    ``save_pretrained``."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_word_tokenizer(words)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-silu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        pad_token_id=0,
        eos_token_id=1,
        is_encoder_decoder=False,
        use_cache=False,
    )
    config.decoder_start_token_id = 0  # (an encoder-only config still records it, as T5 checkpoints do)
    with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's global random stream
        torch.manual_seed(seed)
        model = T5EncoderModel(config).eval()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
