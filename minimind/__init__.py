"""A teaching-first book that rebuilds a small ChatGPT-style language model from zero

Modules:

- `minimind.engine`: The training loop every stage of the book uses: mixed precision, gradient accumulation, clipping, a warmup + cosine schedule, held-out evaluation, atomic checkpoints with exact resume, and DDP under `torchrun`.
- `minimind.generate`: One inference engine for the whole book: a preallocated KV cache, greedy and sampled decoding, stop tokens and strings, streaming text, and batches of prompts of different lengths.
- `minimind.hub`: Load upstream MiniMind checkpoints with `strict=True`, and export ours so that `transformers` loads them as Llama or Qwen3, with no custom code.
- `minimind.model`: RMSNorm, rotary positions with YaRN, grouped-query attention, SwiGLU, and the causal language model whose weights load upstream's MiniMind checkpoints as they are.
- `minimind.moe`: A router sends each token to a few of many feed-forward experts: top-k routing, routed and shared experts, grouped dispatch, the load-balance loss and auxiliary-loss-free balancing, with upstream's parameter names.
- `minimind.quant`: Decoding one token streams every weight from memory once: we measure that limit, bring the engine's fp32 decode close to it, then halve the bytes twice over with int8 weights, at the same held-out perplexity.
- `minimind.shards`: Pretraining text is validated and tokenized once, in parallel, into a flat `uint16` token file cached by content; training reads fixed-length packed rows straight from a memory map, so memory stays flat however big the corpus is."""

__version__ = "0.1.0"
