"Tests of minimind.generate: KV cache == full forward, batching, sampling, stopping, streaming."
import pytest
import torch
from hypothesis import given, strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minimind.generate import (IncrementalDecoder, KVCache, StopFilter, apply_repetition_penalty, decode_step,
                               generate, generate_text, generate_tokens, left_pad, sample_next, stream, top_k_filter,
                               top_p_filter)
from minimind.model import MiniMindConfig

from conftest import sharp_micro


@torch.no_grad()
def greedy_full(model, ids, n):
    "Reference: greedy decoding with a full forward pass every step."
    for _ in range(n): ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


# ---- KV cache ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qk_norm", [False, True])
def test_cached_decode_equals_full_forward(qk_norm):
    m = sharp_micro(qk_norm=qk_norm)
    ids = torch.randint(3, 512, (2, 6))
    with torch.no_grad():
        cache = KVCache.for_model(m, 2, 30)
        logits = decode_step(m, ids, cache)
        for _ in range(20):
            full = m(ids).logits[:, -1]
            torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
            nxt = full.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            logits = decode_step(m, nxt, cache)
        assert cache.pos == ids.shape[1]


def test_chunked_prefill_equals_full_forward():
    "Several new tokens after a filled cache (e.g. the next chat turn) see the cache and each other causally."
    m = sharp_micro()
    ids = torch.randint(3, 512, (1, 14))
    with torch.no_grad():
        cache = KVCache.for_model(m, 1, 14)
        m(ids[:, :8], past_key_values=cache)
        got = m(ids[:, 8:], past_key_values=cache).logits
        torch.testing.assert_close(got, m(ids).logits[:, 8:], atol=1e-5, rtol=0)


def test_cache_is_preallocated_and_bounded():
    m = sharp_micro()
    cache = KVCache.for_model(m, 1, 5)
    ptrs = [k.data_ptr() for k in cache.k]
    with torch.no_grad():
        decode_step(m, torch.randint(3, 512, (1, 4)), cache)
        decode_step(m, torch.tensor([[7]]), cache)
        assert [k.data_ptr() for k in cache.k] == ptrs and cache.k[0].shape == (1, 2, 5, 16)
        with pytest.raises(ValueError, match="holds 5"): decode_step(m, torch.tensor([[7]]), cache)


# ---- batching ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qk_norm", [False, True])
def test_batched_left_padded_greedy_equals_one_by_one(qk_norm):
    m = sharp_micro(qk_norm=qk_norm)
    torch.manual_seed(1)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (3, 11, 7, 1)]
    ids, mask = left_pad(prompts)
    assert mask.sum(1).tolist() == [3, 11, 7, 1]
    out = generate(m, ids, mask, max_new_tokens=12, stop_ids=[])
    for i, p in enumerate(prompts):
        alone = greedy_full(m, torch.tensor([p]), 12)[0, len(p):]
        assert out[i, ids.shape[1]:].tolist() == alone.tolist()


@pytest.mark.parametrize("explicit_positions", [False, True])
def test_left_padded_decode_logits_equal_unpadded(explicit_positions):
    "Step by step, the logits of each left-padded row equal a full forward pass over that row alone."
    m = sharp_micro()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    ids, mask = left_pad(prompts)
    B, T, n = *ids.shape, 6
    full_mask = torch.cat([mask, torch.ones(B, n, dtype=torch.long)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        cache = KVCache.for_model(m, B, T + n)
        logits = decode_step(m, ids, cache, pos if explicit_positions else None, mask)
        for step in range(n):
            for i, s in enumerate(seqs):
                torch.testing.assert_close(logits[i], m(torch.tensor([s])).logits[0, -1], atol=1e-5, rtol=0)
            nxt = logits.argmax(-1)
            for i, s in enumerate(seqs): s.append(int(nxt[i]))
            pos = pos[:, -1:] + 1
            logits = decode_step(m, nxt[:, None], cache, pos if explicit_positions else None,
                                 full_mask[:, :T + step + 1])


def test_batched_with_repetition_penalty_equals_one_by_one():
    m = sharp_micro()
    prompts = [[5, 6, 7, 5, 9], [8, 8]]
    ids, mask = left_pad(prompts)
    out = generate(m, ids, mask, max_new_tokens=10, stop_ids=[], repetition_penalty=1.5)
    for i, p in enumerate(prompts):
        alone = generate(m, torch.tensor([p]), max_new_tokens=10, stop_ids=[], repetition_penalty=1.5)
        assert out[i, ids.shape[1]:].tolist() == alone[0, len(p):].tolist()


# ---- sampling ----------------------------------------------------------------------------------------------

def test_temperature_zero_is_greedy():
    m = sharp_micro()
    x = torch.randint(3, 512, (1, 5))
    want = greedy_full(m, x, 10)
    assert torch.equal(generate(m, x, max_new_tokens=10, temperature=0.0, stop_ids=[]), want)
    assert torch.equal(generate(m, x, max_new_tokens=10, temperature=0.0, top_k=3, top_p=0.5, stop_ids=[]), want)


def test_same_seed_same_sample():
    m = sharp_micro()
    x = torch.randint(3, 512, (3, 5))
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=100, top_p=0.95, stop_ids=[])
    a, b = generate(m, x, seed=123, **kw), generate(m, x, seed=123, **kw)
    g1, g2 = torch.Generator().manual_seed(123), torch.Generator().manual_seed(123)
    assert torch.equal(a, b)
    assert torch.equal(generate(m, x, generator=g1, **kw), generate(m, x, generator=g2, **kw))
    assert not torch.equal(a, generate(m, x, seed=124, **kw))


def test_sampling_filters():
    z = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    assert top_k_filter(z, 3).isfinite().sum() == 3 and top_k_filter(z, 100).isfinite().all()
    p = z.softmax(-1)[0]
    for top_p in (0.3, 0.6, 0.8, 0.95):
        n = int(top_p_filter(z, top_p).isfinite().sum())
        assert p[:n - 1].sum() < top_p <= p[:n].sum() + 1e-6
    assert top_p_filter(z[:, [2, 0, 1]], 0.0).isfinite().tolist() == [[False, True, False]]  # p = 0: the best token stays
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(z, 1.0, top_k=2, generator=g) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {0, 1}
    seen = torch.tensor([[True, False, False, False, False, False, True, False]])
    r = apply_repetition_penalty(z, seen, 2.0)
    assert r[0, 0] == 1.5 and r[0, 6] == -2.0 and torch.equal(r[0, 1:6], z[0, 1:6])


# ---- stopping ----------------------------------------------------------------------------------------------

def test_max_new_tokens_and_stop_ids():
    m = sharp_micro()
    ids, mask = left_pad([[5, 6, 7], [9, 10]])
    free = generate(m, ids, mask, max_new_tokens=9, stop_ids=[])
    assert free.shape == (2, 3 + 9)
    stop = free[0, 3 + 2].item()                   # row 0's third new token
    out = generate(m, ids, mask, max_new_tokens=9, stop_ids=[stop], pad_id=0)
    new0 = out[0, 3:].tolist()
    k = new0.index(stop)
    assert k <= 2 and new0[:k + 1] == free[0, 3:3 + k + 1].tolist() and all(t == 0 for t in new0[k + 1:])
    row1 = free[1, 3:].tolist()
    if stop in row1: j = row1.index(stop); assert out[1, 3:3 + j + 1].tolist() == row1[:j + 1]
    else: assert out[1, 3:].tolist() == row1[:out.shape[1] - 3]
    # all rows stopped -> the loop ends early
    only = generate(m, ids[:1], max_new_tokens=9, stop_ids=[stop])
    assert only.shape[1] == 3 + k + 1 and only[0, -1].item() == stop


def test_default_stop_is_eos_and_positions_are_capped():
    m = sharp_micro(eos_token_id=7, max_position_embeddings=24)
    steps = list(generate_tokens(m, torch.tensor([[5, 6]]), max_new_tokens=10_000))
    assert len(steps) <= 24 - 2
    assert all(s.item() != 7 for s in steps[:-1])
    assert len(steps) == 22 or steps[-1].item() == 7
    with pytest.raises(ValueError, match="max_position_embeddings"): m(torch.zeros(1, 25, dtype=torch.long))


# ---- streaming text ---------------------------------------------------------------------------------------

CORPUS = ["The cat sat on the mat.", "小猫坐在垫子上。", "一只小猫和一只小狗。", "天气很好，我们去公园吧！"] * 10


class DuckTokenizer:
    "The tokenizer interface the engine relies on: encode, decode, apply_chat_template, eos_id, pad_id."
    def __init__(self):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(CORPUS, trainer)
        self.tok, self.pad_id, self.eos_id = tok, 0, 2
    def encode(self, text): return self.tok.encode(text).ids
    def decode(self, ids): return self.tok.decode(list(ids), skip_special_tokens=False)
    def apply_chat_template(self, messages, add_generation_prompt=False):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
    def __len__(self): return self.tok.get_vocab_size()


@pytest.fixture(scope="module")
def tok(): return DuckTokenizer()


def test_incremental_decoder_never_splits_characters(tok):
    text = "小狗坐在公园里，天气很好！The cat 很好。"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)          # some tokens are parts of a character
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("prompt", ["一只小", [{"role": "user", "content": "小猫在哪里？"}]])
def test_stream_joins_to_decoded_generation(tok, prompt):
    m = sharp_micro(vocab_size=len(tok))
    pieces = list(stream(m, tok, prompt, max_new_tokens=25, stop_ids=[]))
    text = prompt if isinstance(prompt, str) else tok.apply_chat_template(prompt, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(text)])
    want = tok.decode(generate(m, ids, max_new_tokens=25, stop_ids=[])[0, ids.shape[1]:].tolist())
    assert "".join(pieces) == want and len(pieces) > 1


def test_stream_of_chinese_from_a_scripted_model(tok):
    "A model that always says the same Chinese sentence: the stream gives it exactly, piece by piece, then stops at eos."
    target = tok.encode("小猫和小狗坐在垫子上。") + [tok.eos_id]
    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = MiniMindConfig.from_preset("micro", vocab_size=len(tok))
            self.lm_head = torch.nn.Linear(1, 1)
        def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, logits_to_keep=0):
            past_key_values.pos += input_ids.shape[1]
            step = past_key_values.pos - n_prompt
            logits = torch.zeros(input_ids.shape[0], 1, len(tok))
            logits[:, 0, target[min(step, len(target) - 1)]] = 1.0
            return type("Out", (), {"logits": logits})()
    prompt = "你好"
    n_prompt = len(tok.encode(prompt))
    pieces = list(stream(Scripted(), tok, prompt, max_new_tokens=50))
    assert "".join(pieces) == "小猫和小狗坐在垫子上。"
    assert not any("\ufffd" in p for p in pieces)
    assert list(stream(Scripted(), tok, prompt, max_new_tokens=50, stop=["坐在"])) and \
        "".join(stream(Scripted(), tok, prompt, max_new_tokens=50, stop=["坐在"])) == "小猫和小狗"


def test_stop_strings_cut_the_stream(tok):
    m = sharp_micro(vocab_size=len(tok))
    full = "".join(stream(m, tok, "The cat", max_new_tokens=30, stop_ids=[]))
    assert len(full) > 6
    cut = full[4:7]
    got = "".join(stream(m, tok, "The cat", max_new_tokens=30, stop_ids=[], stop=[cut]))
    assert got == full[:full.find(cut)]


@given(st.text("ab</s>", max_size=30), st.lists(st.integers(1, 3), min_size=30, max_size=30),
       st.lists(st.sampled_from(["</s>", "ab", "b<", "s", "</", "aab"]), max_size=3))
def test_stop_filter_equals_cutting_the_whole_text(text, sizes, stops):
    "However the text arrives in pieces, they join to the text cut before its first stop string."
    f, bounds = StopFilter(stops), [0]
    while bounds[-1] < len(text): bounds.append(min(bounds[-1] + sizes[len(bounds) - 1], len(text)))  # pieces of 1-3 characters
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
    out, longest = "", max((len(s) for s in stops), default=1)
    for a, b in zip(bounds, bounds[1:]):
        out += f.push(text[a:b])
        assert len(out) >= min(b, len(text) if first is None else first) - (longest - 1)  # holds back no more than it must
    out += f.flush()
    assert out == text[:first] and f.stopped == (first is not None)


def test_generate_text_batched_equals_single(tok):
    m = sharp_micro(vocab_size=len(tok))
    prompts = ["The cat", [{"role": "user", "content": "小猫?"}], "一只小猫和一只"]
    batched = generate_text(m, tok, prompts, max_new_tokens=10, stop_ids=[])
    assert batched == [generate_text(m, tok, [p], max_new_tokens=10, stop_ids=[])[0] for p in prompts]
