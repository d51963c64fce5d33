"""From-scratch decoder models, their KV cache, token sampling, checkpoint surgery and
the Hugging Face bridge (transformers is imported only when the bridge is used)."""

from lab.models.cache import KVCache
from lab.models.convert import mean_pool_kv_heads
from lab.models.gpt import GPT, GPTConfig
from lab.models.hf import ModelUnavailableError, export_hf, load_hf_causal_lm, load_lab_from_hf
from lab.models.sampling import filter_top_k, filter_top_p, sample_next

__all__ = [
    "GPT",
    "GPTConfig",
    "KVCache",
    "ModelUnavailableError",
    "export_hf",
    "filter_top_k",
    "filter_top_p",
    "load_hf_causal_lm",
    "load_lab_from_hf",
    "mean_pool_kv_heads",
    "sample_next",
]
