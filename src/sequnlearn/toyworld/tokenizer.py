"""A byte-level BPE tokenizer trained locally on the toy-world text, wrapped for transformers."""

from __future__ import annotations

from typing import Iterable

EOS = "<|endoftext|>"

ANSWER_LETTERS = " A B C D"
"""lm-eval scores a letter-format answer as the continuation ``" A"``..``" D"``, one token each in
GPT-NeoX's tokenizer. BPE on the toy text alone merges ``" A"`` and ``" D"`` (from words such as
"A visit") but leaves ``" B"`` and ``" C"`` as two tokens, so answers B and C would be scored over
two positions and A and D over one. The trainer sees this line :data:`LETTER_PRIMER_COPIES` times,
which makes the four merges come first."""

LETTER_PRIMER_COPIES = 1000


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int = 2048):
    """Train a byte-level BPE tokenizer (GPT-2 style, no prefix space) on ``texts``.

    All 256 byte symbols are in the vocabulary, so any text round-trips exactly. The only special
    token is ``<|endoftext|>``, used as eos, bos and pad; padding is on the right. Each answer letter
    with its space (``" A"``..``" D"``) is one token, as in GPT-NeoX's (see :data:`ANSWER_LETTERS`).

    Args:
        texts: training text (the corpora and MCQ examples of the world).
        vocab_size: target vocabulary size (bytes + merges + ``<|endoftext|>``); the trainer
            stops earlier when the text has no more pairs to merge.
        model_max_length: recorded as the tokenizer's ``model_max_length``.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) + [ANSWER_LETTERS] * LETTER_PRIMER_COPIES, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=None, model_max_length=model_max_length)
    fast.padding_side = "right"
    return fast
