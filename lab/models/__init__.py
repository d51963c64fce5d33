"""From-scratch decoder models and the Hugging Face bridge.

config.py     GPTConfig (every swappable part) and its validation
gpt.py        the layers and the forward pass (nanoGPT's model.py, with the options)
positions.py  learned / sinusoidal / RoPE / ALiBi positions and the attention masks
moe.py        the mixture-of-experts MLP
generate.py   prefill, one-token decoding and generate() (mixed into GPT)
cache.py      the KV cache (ring buffer with a sliding window) and its step API
sampling.py   temperature, top-k, top-p
convert.py    checkpoint surgery (MHA -> GQA)
hf.py         export to / load from Hugging Face (transformers imported only when used)
"""

from lab.models.cache import KVCache
from lab.models.config import GPTConfig
from lab.models.convert import mean_pool_kv_heads
from lab.models.gpt import GPT
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
