"""Reference models used by the examples, benchmarks and tests."""

from funzero.models._gpt import GPT, GPTConfig, gpt_config

__all__ = ["GPT", "GPTConfig", "gpt_config"]
