"""From-scratch decoder models and token sampling."""

from lab.models.gpt import GPT, GPTConfig
from lab.models.sampling import filter_top_k, filter_top_p, sample_next

__all__ = ["GPT", "GPTConfig", "filter_top_k", "filter_top_p", "sample_next"]
