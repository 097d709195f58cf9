"""A teaching-first book that rebuilds a small ChatGPT-style language model from zero

Modules:

- `minimind.agent`: Chapter 13's tools, used for real: episodes that run a model's calls to the end, SFT on tool conversations, and agentic RL (GRPO over whole tool-using episodes), with the `tools` and `agent` stages of `python -m minimind.train`.
- `minimind.api`: OpenAI's chat-completion formats for the server: requests checked field by field (tools, `tool_choice`, tool messages and the thinking switch included) into the prompt's tokens, and replies turned into `reasoning_content`, `content` and `tool_calls`.
- `minimind.chat`: `python -m minimind.chat --model RUN_OR_DIR`: a terminal chat that streams tokens, keeps the conversation, shows or hides think traces, and takes sampling flags; the same chat as a notebook widget.
- `minimind.compute`: How a training step computes on this machine: the autocast dtype, whose matrix products, and the fastest way, timed once on the machine's own model and remembered.
- `minimind.distill`: A small student learns from a bigger teacher's whole next-token distribution, not only from the one token the data says: soft targets, temperature, forward and reverse KL, and a teacher -> student run on TinyWorld.
- `minimind.dpo`: From Bradley-Terry to the DPO loss: summed reply log-probabilities under the policy and a frozen reference, cached reference log-probs, preference metrics, and a run on TinyWorld's chosen/rejected pairs.
- `minimind.engine`: The training loop every stage of the book uses: mixed precision, gradient accumulation, clipping, a warmup + cosine schedule, held-out evaluation, atomic checkpoints with exact resume, and DDP under `torchrun`.
- `minimind.estimate`: How long each chapter's full-scale command takes on a T4, an RTX 3090, an A100 or 8 GPUs, and whether it fits: FLOPs at an assumed MFU, and activation memory measured on the CPU. Estimates, labelled so, until a GPU times them.
- `minimind.eval`: `python -m minimind.eval --model RUN_OR_DIR --task ...`: held-out perplexity, multiple-choice accuracy by log-likelihood (C-Eval / CMMLU style, and a TinyWorld set made offline), and reasoning accuracy; one table for every model the book trains.
- `minimind.generate`: One inference engine for the whole book: a preallocated KV cache, greedy and sampled decoding, stop tokens and strings, streaming text, and batches of prompts of different lengths.
- `minimind.grpo`: Group relative policy optimisation with verifiable rewards: group-relative advantages, a clipped ratio, a KL leash and a difficulty curriculum, as a batch source and a loss on the one training engine.
- `minimind.harness`: The book's exported models, read by tools we did not write: EleutherAI's lm-evaluation-harness scores TinyWorld's multiple choice as `python -m minimind.eval` does, and a LoRA adapter trained with Hugging Face's `peft` merges into weights that `minimind` loads with the same logits.
- `minimind.hub`: Load upstream MiniMind checkpoints with `strict=True`, and export ours so that `transformers` loads them as Llama or Qwen3, with no custom code.
- `minimind.lora`: Fine-tune a model by training two thin matrices per layer instead of the whole weight: the rank and the alpha/rank scaling, which layers to adapt, adapters saved alone in a small file, loaded, merged and unmerged, and a new name for the assistant in under a minute on a CPU.
- `minimind.model`: RMSNorm, rotary positions with YaRN, grouped-query attention, SwiGLU, and the causal language model whose weights load upstream's MiniMind checkpoints as they are.
- `minimind.moe`: A router sends each token to a few of many feed-forward experts: top-k routing, routed and shared experts, grouped dispatch, the load-balance loss and auxiliary-loss-free balancing, with upstream's parameter names.
- `minimind.quant`: Decoding one token streams every weight from memory once: we measure that limit, bring the engine's fp32 decode close to it, then halve the bytes twice over with int8 weights, at the same held-out perplexity.
- `minimind.reason`: R1-style reasoning for a small model: exact think traces distilled with weighted tags, rewards a program can check, and accuracy on held-out problems.
- `minimind.runs`: What a stage is, where it writes, how it knows that the stages it reads are done and still valid, and where this process stands among the processes `torchrun` started.
- `minimind.serve`: `python -m minimind.serve --model RUN_OR_DIR`: `POST /v1/chat/completions` (plain and streamed), `GET /v1/models`, OpenAI-style errors, tool calls, concurrent requests on one model, and a small chat page at `/`.
- `minimind.shards`: Pretraining text is validated and tokenized once, in parallel, into a flat `uint16` token file cached by content; training reads fixed-length packed rows straight from the file, so memory stays flat however big the corpus is.
- `minimind.tools`: A model that cannot add 48213 + 9077 in its head can still write `{"name": "add", "arguments": {"a": 48213, "b": 9077}}`. This chapter builds what turns such a line into an answer: minimind-3's chat template with tools and the thinking switch, a parser for the calls a reply makes, and a registry that runs them safely."""

__version__ = "0.1.0"
