"""The typed configuration of a toy world: world size, tokenizer, base model and pretraining."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from sequnlearn.errors import UserError

MAX_ENTITIES = 200
"""Upper bound on entities per domain (the name generator yields a few hundred distinct names)."""

MAX_PARAPHRASES = 4
"""Number of paraphrase templates each attribute has (see :mod:`sequnlearn.toyworld.world`)."""

LETTER_OFF: dict[str, Any] = dict(fact_copies=1, mcq_examples_per_fact=0, practice_entities=0, practice_mcq_per_fact=0,
                                  practice_context_mcq_per_fact=0, match_mcq_examples=0, match_stage_examples=0,
                                  match_steps=0, match_lr=0.0)
"""The letter-format curriculum switched off: the values of its fields in every world built before
they existed, and in :meth:`ToyWorldConfig.reduced` (the tests' world answers in cloze format)."""


@dataclass(frozen=True)
class ToyWorldConfig:
    """Everything that determines a toy world; the same config always builds the same world.

    The defaults are the full world: an 8-layer 128-wide GPT-NeoX that answers the world's questions
    in cloze and in lm-eval's letter format, pretrained by a two-stage curriculum for 4,000 steps
    (35 minutes on one CPU thread; its model is shipped, so a build copies it). The letter-format
    fields (:data:`LETTER_OFF` switches them off) are what teaches that format (how it was found: the "Letter format"
    section of ``docs/toy-world-findings.md`` up to commit 0e1ea97, in its git history). :meth:`reduced` is a small cloze-only world for tests (about
    half a minute).
    """

    seed: int = 0
    """Master seed: facts, corpora, MCQ sets, tokenizer input and model initialisation follow from it."""

    forget_entities: int = 40
    """Number of invented pathogens in the forget ("hazard") domain; 4 facts each."""

    retain_entities: int = 40
    """Number of invented cities in the retain ("general knowledge") domain; 4 facts each."""

    paraphrases: int = 3
    """Paraphrase templates per fact in the corpora and the pretraining mix (1 to 4; the first is the
    MCQ stem). Each one more costs pretraining steps: the model must see every sentence often.

    Three, not two, because of what unlearning needs: with two (220 steps) the model knew the
    facts (cloze 0.97 forget / 0.94 retain) but `toy-l2` only took forget to 0.79 (retain 0.91), and
    no coefficient, learning rate, epoch count or LoRA rank of the 7..4 schedule reached 0.55
    without losing retain; the knowledge sat in template-specific form. With three (260 steps, on the
    cloze-only world of the time) base 1.0 / 0.99, and `toy-l2` gives forget 0.49 / retain 0.98 (seeds 1, 2: 0.55, 0.48)."""

    sentences_per_doc: int = 2
    """Sentences per corpus document (documents mix facts of different entities of one domain); the
    defaults give 240 forget documents (full) and 48 (reduced)."""

    qa_per_fact: int = 1
    """Copies per fact of ``"Question: <stem>\\nAnswer: <value>"`` (the evaluator's cloze template) in
    the pretraining mix; 0 leaves them out."""

    fact_copies: int = 20
    """Copies of every fact text (sentences and answered cloze questions) in the pretraining mix.
    Each copy brings its own draw of the letter-format MCQs (the ``*_mcq_*`` counts below are per
    copy): one pass over a mix of N copies shows each fact N times and an MCQ twice only when two draws
    coincide (at the defaults 98% of the fact MCQs and 89% of the match MCQs are distinct). A small model
    memorises a repeated MCQ's letter (with one copy: 1.000 on the training MCQs, 0.46 / 0.53 on the
    held-out evaluation) instead of learning to answer it from the fact; with 20 copies, the default,
    the same curriculum reaches 0.84 / 0.86."""

    mcq_examples_per_fact: int = 4
    """Answered letter-format MCQs per forget/retain fact in the pretraining mix (0 leaves them out).
    They never show an evaluation question: each asks with a paraphrase stem, not the evaluation's,
    and with another distractor set."""

    practice_entities: int = 40
    """Invented plants in the third, never-evaluated "practice" domain (0: none). Their facts are
    pretrained like the others', and their letter-format MCQs teach the closed-book use of the format
    on facts the evaluation never asks about."""

    practice_mcq_per_fact: int = 6
    """Answered letter-format MCQs per practice fact (each with its own stem, distractors, letter)."""

    practice_context_mcq_per_fact: int = 2
    """Answered letter-format MCQs per practice fact that state the fact on a line before the
    question (reading comprehension: the easy form of the skill, a curriculum for the closed-book one)."""

    match_mcq_examples: int = 1000
    """Answered letter-format MCQs in the pretraining mix whose question names the answer ("Which of
    these is red?"), drawn over all attributes: the format's mechanics (find the named choice, answer
    its letter) without a fact. After a first stage (``match_steps``) they keep the skill it taught;
    mixed in alone (4,000 steps) they never taught it."""

    match_stage_examples: int = 40000
    """Match MCQs (as ``match_mcq_examples``, another draw) that the first ``match_steps`` steps
    train on alone; they are not in the mix the later steps train on."""

    mcq_answer_weight: float = 5.0
    """Pretraining loss weight of the answer letter of each letter-format MCQ. In an MCQ about facts
    the question and choices are not trained on (three choices are false statements about the
    entity); a match MCQ states no fact and trains them with weight 1."""

    vocab_size: int = 1024
    """Size of the byte-level BPE vocabulary trained on the corpora (256 bytes + merges + EOS)."""

    hidden_size: int = 128
    """Width of the GPT-NeoX base model."""

    num_layers: int = 8
    """Decoder layers of the base model (8 maps the reference's layers 28..16 of 32 to 7..4)."""

    num_heads: int = 4
    """Attention heads; must divide ``hidden_size``."""

    seq_len: int = 64
    """Tokens per pretraining row (documents are packed whole, never split; a fact sentence is
    10-20 tokens, a letter-format MCQ about 40)."""

    batch_size: int = 32
    """Rows per pretraining step."""

    steps: int = 4000
    """Optimizer steps of pretraining."""

    match_steps: int = 1500
    """The first this many of ``steps`` train on the ``match_stage_examples`` alone, a curriculum:
    the format's mechanics before the facts and the closed-book questions that need them (at
    ``match_lr`` 1e-3 the held-out match accuracy leaves chance after 1,000 to 1,250 steps and is 0.99 at 1,500)."""

    lr: float = 2e-3
    """Peak AdamW learning rate (linear warmup, then cosine decay to ``min_lr_ratio * lr``)."""

    match_lr: float = 1e-3
    """Learning rate of the first stage (``match_steps``), constant after the warmup; 0: ``lr``. The
    later steps then warm up again to ``lr`` and decay over the rest of the run."""

    warmup_steps: int = 40
    """Linear learning-rate warmup steps."""

    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``."""

    weight_decay: float = 0.0
    """AdamW weight decay (memorising facts works best without it)."""

    def __post_init__(self) -> None:
        """Check ranges and cross-field constraints.

        Raises:
            UserError: a field is out of range or of the wrong type; the message names the field and the fix.
        """
        from sequnlearn.config import coerce_fields

        coerce_fields(self)  # e.g. lr=2e-3 from --set, which YAML reads as a string
        for name in ("forget_entities", "retain_entities"):
            n = getattr(self, name)
            if not 4 <= n <= MAX_ENTITIES:
                raise UserError(f"{name}={n}: give between 4 and {MAX_ENTITIES} entities")
        if self.practice_entities and not 4 <= self.practice_entities <= MAX_ENTITIES:
            raise UserError(f"practice_entities={self.practice_entities}: give 0 (none) or 4 to {MAX_ENTITIES}")
        if not 1 <= self.paraphrases <= MAX_PARAPHRASES:
            raise UserError(f"paraphrases={self.paraphrases}: give 1 to {MAX_PARAPHRASES}")
        for name in ("fact_copies", "sentences_per_doc", "hidden_size", "num_layers", "num_heads", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)}: must be a positive integer")
        for name in ("qa_per_fact", "mcq_examples_per_fact", "practice_mcq_per_fact", "practice_context_mcq_per_fact",
                     "match_mcq_examples", "match_stage_examples", "warmup_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"{name}={getattr(self, name)}: must be >= 0")
        if not 0 <= self.match_steps < self.steps or bool(self.match_steps) != bool(self.match_stage_examples):
            raise UserError(f"match_steps={self.match_steps}, match_stage_examples={self.match_stage_examples}: give "
                            f"both 0, or both > 0 with match_steps < steps={self.steps} (the first stage trains on "
                            "the stage's MCQs alone)")
        if not 300 <= self.vocab_size <= 65536:
            raise UserError(f"vocab_size={self.vocab_size}: give 300 to 65536 (256 byte tokens come first)")
        if self.hidden_size % self.num_heads:
            raise UserError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; change one")
        if self.seq_len < 64:
            raise UserError(f"seq_len={self.seq_len}: use at least 64 so every document fits in a row")
        if not self.mcq_answer_weight >= 0:
            raise UserError(f"mcq_answer_weight={self.mcq_answer_weight}: must be >= 0")
        if not (self.lr > 0 and self.match_lr >= 0 and 0 <= self.min_lr_ratio <= 1 and self.weight_decay >= 0):
            raise UserError("lr must be > 0, match_lr >= 0, min_lr_ratio in [0, 1] and weight_decay >= 0")

    @classmethod
    def reduced(cls, **overrides: Any) -> "ToyWorldConfig":
        """A small world for tests: 12 entities per domain, a 4-layer 64-wide model, about 30 s to build.

        Args:
            **overrides: fields to change on top of the reduced settings (e.g. ``seed=3``).

        Returns:
            The reduced config.

        Raises:
            UserError: an override is not a field, or its value is out of range.
        """
        base = dict(forget_entities=12, retain_entities=12, paraphrases=2, vocab_size=512, hidden_size=64, num_layers=4,
                    num_heads=4, seq_len=64, batch_size=16, steps=160, lr=1e-2, warmup_steps=10)
        return cls.from_dict({**base, **LETTER_OFF, **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ToyWorldConfig":
        """Build a config from a mapping, rejecting unknown keys.

        Raises:
            UserError: a key is not a field of :class:`ToyWorldConfig` (with the closest one), or a
                value is out of range.
        """
        from sequnlearn.config import build

        return build(cls, d)

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain JSON-able dict."""
        return asdict(self)

    def differences(self, stored: dict[str, Any] | None) -> list[str]:
        """Fields in which a stored config (a ``world.json``'s) differs from this one, sorted.

        A field the stored config lacks counts at the value that built worlds before it existed: a
        field of the letter-format curriculum at :data:`LETTER_OFF`, any other at its default (fields
        are added with a default that keeps the world as it was).
        """
        if stored is None:  # no config recorded: nothing is known to match
            return sorted(self.to_dict())
        before = {**asdict(ToyWorldConfig()), **LETTER_OFF}
        return sorted(k for k, v in self.to_dict().items() if stored.get(k, before[k]) != v)

    def with_(self, **changes: Any) -> "ToyWorldConfig":
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)
