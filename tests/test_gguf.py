"""Tests for the GGUF export in minimind.hub: llama.cpp's names and metadata, the q/k row order of its `llama`
architecture, exact round trips, the Ollama Modelfile, and the command line's error lines."""
import json

import gguf
import pytest
import torch
from conftest import run_cli
from tokenizers import Tokenizer, pre_tokenizers

from minimind.hub import (GGUF_ARCHS, export_gguf, export_hf, llama_cpp_pre, load_gguf, main, read_gguf,
                          rope_deinterleave, rope_interleave)
from minimind.model import MiniMindConfig, MiniMindForCausalLM, apply_rope, precompute_rope
from minimind.tokenizer import MiniMindTokenizer


def make(vocab_size, seed=0, **overrides):
    "A random micro model in eval mode, norm gains randomised too (a lost or swapped gain shows in the logits)."
    torch.manual_seed(seed)
    m = MiniMindForCausalLM(MiniMindConfig.from_preset("micro", vocab_size=vocab_size, **overrides)).eval()
    with torch.no_grad():
        for k, p in m.named_parameters():
            if k.endswith("norm.weight"): p.uniform_(0.5, 1.5)
    return m


LAYOUTS = {"llama": dict(qk_norm=False, rms_norm_eps=1e-5), "qwen3": dict(head_dim=24)}  # MiniMind2- and minimind-3-style


def field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    "layout -> (model, .gguf path), float32, the model's vocab 5 rows larger than the tokenizer."
    out = {}
    for layout, kw in LAYOUTS.items():
        m = make(len(tok) + 5, **kw)
        out[layout] = m, export_gguf(m, tmp_path_factory.mktemp(layout) / "minimind.gguf", tok)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_is_exact_and_logits_agree(exported, layout):
    m, path = exported[layout]
    back = load_gguf(path)
    assert back.config.to_dict() == {**m.config.to_dict(), "initializer_range": back.config.initializer_range}
    ours, theirs = m.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours: assert torch.equal(ours[k], theirs[k]), k
    assert back.lm_head.weight is back.model.embed_tokens.weight                    # still tied
    ids = torch.randint(3, m.config.vocab_size, (2, 13))
    mask = torch.ones_like(ids); mask[0, :4] = 0                                      # left padding
    with torch.no_grad(): diff = (back(ids, attention_mask=mask).logits - m(ids, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max() < 1e-4


def test_tensor_names_are_llama_cpps(exported):
    for layout, (m, path) in exported.items():
        arch = GGUF_ARCHS[layout]
        known = {gguf.TENSOR_NAMES[t].format(bid=i) + ".weight" for t in gguf.MODEL_TENSORS[arch]
                 for i in range(m.config.num_hidden_layers)}
        names = [t.name for t in read_gguf(path).tensors]
        assert set(names) <= known and len(names) == len(set(names))
        assert "output.weight" not in names                                          # tied: llama.cpp reuses token_embd
        assert ("blk.1.attn_q_norm.weight" in names) == (layout == "qwen3")
        assert len(names) == len(m.state_dict()) - 1


def test_llama_rows_give_our_scores_under_adjacent_pair_rope(exported):
    "The llama file's q/k rows, rotated in adjacent pairs as llama.cpp's llama does, give our attention scores."
    m, path = exported["llama"]
    c, d = m.config, m.config.head_dim
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in read_gguf(path).tensors}
    wq, wk = m.model.layers[0].self_attn.q_proj.weight.detach(), m.model.layers[0].self_attn.k_proj.weight.detach()
    assert not torch.equal(stored["blk.0.attn_q.weight"], wq)                        # the rows did move
    cos, sin = precompute_rope(d, 16, c.rope_theta)
    freqs = 1.0 / c.rope_theta ** (torch.arange(0, d, 2).float() / d)
    def adjacent(x, pos):
        a = pos * freqs
        return torch.stack([x[0::2] * a.cos() - x[1::2] * a.sin(), x[1::2] * a.cos() + x[0::2] * a.sin()], -1).flatten()
    x, y = torch.randn(c.hidden_size), torch.randn(c.hidden_size)
    for h in range(c.num_attention_heads):
        kv = h // (c.num_attention_heads // c.num_key_value_heads)
        q_rows, k_rows = slice(h * d, (h + 1) * d), slice(kv * d, (kv + 1) * d)
        ours = apply_rope(wq[q_rows] @ x, cos[3], sin[3]) @ apply_rope(wk[k_rows] @ y, cos[11], sin[11])
        theirs = adjacent(stored["blk.0.attn_q.weight"][q_rows] @ x, 3) @ adjacent(stored["blk.0.attn_k.weight"][k_rows] @ y, 11)
        unmoved = adjacent(wq[q_rows] @ x, 3) @ adjacent(wk[k_rows] @ y, 11)
        assert abs(ours - theirs) < 1e-4 and abs(ours - unmoved) > 1e-3


def test_interleave_is_a_permutation_and_deinterleave_undoes_it():
    rows = torch.arange(16.).reshape(16, 1)
    assert rope_interleave(rows, 2).flatten().int().tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    w = torch.randn(24, 5)
    assert torch.equal(rope_deinterleave(rope_interleave(w, 3), 3), w)


def test_metadata_values(exported, tok):
    m, path = exported["llama"]
    c, r = m.config, read_gguf(path)
    assert field(r, "general.architecture") == "llama"
    assert field(r, "general.file_type") == gguf.LlamaFileType.ALL_F32
    expect = {"llama.vocab_size": c.vocab_size, "llama.context_length": c.max_position_embeddings,
              "llama.embedding_length": c.hidden_size, "llama.block_count": c.num_hidden_layers,
              "llama.feed_forward_length": c.intermediate_size, "llama.attention.head_count": c.num_attention_heads,
              "llama.attention.head_count_kv": c.num_key_value_heads, "llama.attention.key_length": c.head_dim,
              "llama.rope.dimension_count": c.head_dim, "llama.rope.freq_base": c.rope_theta,
              "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.eos_id,
              "tokenizer.ggml.padding_token_id": tok.pad_id, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
              "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": tok.chat_template}
    assert {k: field(r, k) for k in expect} == expect
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5, rel=1e-6)
    assert field(r, "llama.rope.scaling.type") is None                               # YaRN is off at 512 positions
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == c.vocab_size
    assert tokens[:len(tok)] == [tok.id_to_token(i) for i in range(len(tok))]
    T = gguf.TokenType
    assert [types[i] for i in (tok.pad_id, tok.bos_id, tok.eos_id)] == [T.CONTROL] * 3
    assert types[tok.token_to_id("<think>")] == T.USER_DEFINED
    assert types[len(tok):] == [T.UNUSED] * 5 and types[300] == T.NORMAL
    merges = json.loads(tok.tokenizer.to_str())["model"]["merges"]
    assert field(r, "tokenizer.ggml.merges") == [x if isinstance(x, str) else " ".join(x) for x in merges]


def test_yarn_keys_when_active(tok, tmp_path):
    yarn = dict(type="yarn", factor=8, original_max_position_embeddings=64, beta_fast=32, beta_slow=1, attention_factor=1.0)
    m = make(len(tok), rope_scaling=yarn)
    r = read_gguf(export_gguf(m, tmp_path / "y.gguf", tok))
    got = {k: field(r, f"qwen3.rope.scaling.{k}") for k in ("type", "factor", "original_context_length",
                                                             "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow")}
    assert got == dict(type="yarn", factor=8.0, original_context_length=64, yarn_attn_factor=1.0, yarn_beta_fast=32.0,
                       yarn_beta_slow=1.0)
    back = load_gguf(tmp_path / "y.gguf")
    assert {k: back.config.rope_scaling[k] for k in yarn if k != "type"} == {k: v for k, v in yarn.items() if k != "type"}
    ids = torch.randint(3, len(tok), (1, 150))                                        # past the 64-position window
    with torch.no_grad(): assert (back(ids).logits - m(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_hold_the_rounded_matrices(tok, tmp_path, dtype):
    m = make(len(tok), **LAYOUTS["llama"])
    path = export_gguf(m, tmp_path / "h.gguf", tok, dtype=dtype)
    assert read_gguf(path).get_field("general.file_type").contents() != gguf.LlamaFileType.ALL_F32
    back = load_gguf(path)
    for k, v in m.state_dict().items(): assert torch.equal(back.state_dict()[k], v.to(dtype).float() if v.dim() > 1 else v), k


def test_untied_model_stores_output(tok, tmp_path):
    m = make(len(tok), tie_word_embeddings=False)
    with torch.no_grad(): m.lm_head.weight.normal_()
    path = export_gguf(m, tmp_path / "u.gguf", tok)
    assert "output.weight" in [t.name for t in read_gguf(path).tensors]
    back = load_gguf(path)
    assert not back.config.tie_word_embeddings and torch.equal(back.lm_head.weight, m.lm_head.weight)


def test_modelfile_written_beside(exported, tok):
    _, path = exported["qwen3"]
    text = (path.parent / "Modelfile").read_text()
    assert text.startswith("FROM ./minimind.gguf\n")
    assert f'PARAMETER stop "{tok.eos_token}"' in text and 'SYSTEM """You are a helpful assistant"""' in text
    assert "{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n" in text


def test_moe_and_unknown_pre_tokenizers_are_refused(tok, tmp_path):
    with pytest.raises(ValueError, match="MoE model"): export_gguf(make(len(tok), use_moe=True), tmp_path / "moe.gguf", tok)
    assert not (tmp_path / "moe.gguf").exists()
    plain = json.loads(tok.tokenizer.to_str())
    plain["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert llama_cpp_pre(MiniMindTokenizer(Tokenizer.from_str(json.dumps(plain)))) == "gpt-2"   # upstream MiniMind2's
    other = Tokenizer.from_str(tok.tokenizer.to_str())
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="no pre-tokenizer"): llama_cpp_pre(MiniMindTokenizer(other))


def test_command_line(tok, tmp_path, capsys):
    d = export_hf(make(len(tok)), tmp_path / "hf", tokenizer=tok)
    out = tmp_path / "out" / "m.gguf"
    main(["gguf", str(d), str(out)])
    assert "wrote" in capsys.readouterr().out and read_gguf(out).get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_F16
    for argv, says in ((["gguf", str(tmp_path / "nope"), str(out)], "not a folder"),
                       (["gguf", str(d), str(out)], "exists; pass --overwrite")):
        with pytest.raises(SystemExit) as e: main(argv)
        assert str(e.value).startswith("error: ") and says in str(e.value)


def test_unreadable_weights_give_one_error_line(tok, tmp_path):
    d = export_hf(make(len(tok)), tmp_path / "hf", tokenizer=tok)
    (d / "model.safetensors").write_bytes(b"not weights at all")
    p = run_cli("gguf", d, tmp_path / "m.gguf", module="minimind.hub", timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: ") and "model.safetensors" in p.stderr
    assert not (tmp_path / "m.gguf").exists()
