"""A teaching-first book that rebuilds a small ChatGPT-style language model from zero

Modules:

- `minimind.generate`: One inference engine for the whole book: a preallocated KV cache, greedy and sampled decoding, stop tokens and strings, streaming text, and batches of prompts of different lengths.
- `minimind.hub`: Load upstream MiniMind checkpoints with `strict=True`, and export ours so that `transformers` loads them as Llama or Qwen3, with no custom code.
- `minimind.model`: RMSNorm, rotary positions with YaRN, grouped-query attention, SwiGLU, and the causal language model whose weights load upstream's MiniMind checkpoints as they are."""

__version__ = "0.1.0"
