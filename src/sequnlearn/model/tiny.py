"""Tiny seeded models and a byte-level tokenizer, built from configs with no downloads.

Used by the ``tiny`` preset (a whole unlearning run in seconds on a CPU) and by the tests.
"""

from __future__ import annotations

import torch

TINY_FAMILIES = ("gpt_neox", "llama", "gpt2", "qwen2", "mistral")
EOS = "<|endoftext|>"


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus ``<|endoftext|>``.

    Returns:
        A ``PreTrainedTokenizerFast`` with right padding and pad = eos.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    fast.padding_side = "right"
    return fast


def tiny_config(family: str = "gpt_neox", *, vocab_size: int = 257, hidden: int = 64, layers: int = 4,
                heads: int = 4, max_len: int = 512):
    """An HF config for a tiny decoder of ``family`` (no dropout, so forwards are deterministic).

    Raises:
        ValueError: ``family`` is not one of :data:`TINY_FAMILIES`.
    """
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, num_hidden_layers=layers, num_attention_heads=heads,
                  hidden_size=hidden, intermediate_size=4 * hidden, max_position_embeddings=max_len,
                  eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 1, tie_word_embeddings=False)
    if family == "gpt_neox":
        return GPTNeoXConfig(**common, rotary_pct=0.25, hidden_dropout=0.0, attention_dropout=0.0,
                             use_parallel_residual=True)
    if family == "llama":
        return LlamaConfig(**common, num_key_value_heads=max(1, heads // 2))
    if family == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=max(1, heads // 2))
    if family == "mistral":
        return MistralConfig(**common, num_key_value_heads=max(1, heads // 2), sliding_window=None)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_layer=layers, n_head=heads, n_embd=hidden,
                          n_positions=max_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 1)
    raise ValueError(f"tiny family {family!r} is unknown; use one of {', '.join(TINY_FAMILIES)}")


def tiny_model(family: str = "gpt_neox", *, seed: int = 0, **config_kwargs):
    """A randomly initialised tiny causal LM (fp32, eval mode), the same for the same seed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config_kwargs), dtype=torch.float32)
    return model.eval()
