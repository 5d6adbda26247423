"""The synthetic toy world: a CPU-sized stand-in for WMDP-Bio (forget) and MMLU (retain).

Invented pathogens (forget domain) and invented cities (retain domain) with seeded attribute values;
text corpora stating every fact in several paraphrases; MCQ sets in the lm-eval record format; a
byte-level BPE tokenizer trained on the text; and a small GPT-NeoX base model pretrained on it, so
the real code paths (HF model and tokenizer, peft, the engine, the evaluator) run in minutes::

    from sequnlearn.toyworld import ToyWorldConfig, build_world

    paths = build_world("runs/toyworld")                      # full world, about 5 min on 2 cores
    paths = build_world("/tmp/tw", ToyWorldConfig.reduced())  # test-sized world, seconds
    paths.model, paths.forget_corpus, paths.forget_mcq, paths.retain_mcq

Importing this package does not import torch; building does.
"""

from sequnlearn.toyworld.build import WORLD_FORMAT, ToyWorldPaths, build_world, load_world_info
from sequnlearn.toyworld.config import ToyWorldConfig
from sequnlearn.toyworld.world import DOMAINS, FORGET, RETAIN, Fact, World, generate_world

__all__ = ["DOMAINS", "FORGET", "RETAIN", "WORLD_FORMAT", "Fact", "ToyWorldConfig", "ToyWorldPaths", "World",
           "build_world", "generate_world", "load_world_info"]
