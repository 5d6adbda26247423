"""sequnlearn: sequential back-to-front unlearning of causal language models."""

__version__ = "0.1.0"
