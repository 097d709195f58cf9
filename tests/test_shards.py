"Tests for minimind.shards: token files match a naive encoding, the cache key, errors, atomic builds, packed rows."
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import minimind.shards as shards
from minimind.data import DataError
from minimind.shards import PackedDataset, TokenFile, build_token_file, token_cache_key
from minimind.tokenizer import train_tokenizer

EN = "the cat dog sat ran on a mat river Lily Tom has apples what is plus happy little walked to".split()
ZH = list("小猫狗坐在垫子上莉莉汤姆有个苹果走到河边加等于几很开心")


def texts(n, seed=0):
    r = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = " ".join(r.choice(EN, r.integers(2, 30)))
        out.append(f"{words} {i} " + "".join(r.choice(ZH, r.integers(1, 20))) + ("。" if i % 3 else "."))
    return out


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(texts(400, seed=1), vocab_size=400)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    "Two JSONL files: 300 and 200 documents."
    d = tmp_path_factory.mktemp("corpus")
    a, b = texts(300, seed=2), texts(200, seed=3)
    return [write_jsonl(d/"a.jsonl", a), write_jsonl(d/"b.jsonl", b)], a + b


def naive(tok, docs):
    return np.array([t for d in docs for t in tok.encode(d) + [0]], dtype=np.uint16)


def test_token_file_equals_naive_encoding(tok, corpus, tmp_path):
    paths, docs = corpus
    tf = build_token_file(paths, tok, out_dir=tmp_path, workers=1, chunk_size=2000)
    np.testing.assert_array_equal(np.asarray(tf[:]), naive(tok, docs))
    assert len(tf) == tf.n_tokens == tf.meta["n_tokens"] == len(naive(tok, docs))
    assert tf.meta["n_docs"] == len(docs) and tf.meta["skipped"] == 0
    assert [s["bytes"] for s in tf.meta["sources"]] == [p.stat().st_size for p in paths]
    assert tf.path.stat().st_size == 2 * tf.n_tokens and tf.tokens.dtype == np.uint16
    assert not tf.tokens.flags.writeable


def test_parallel_and_serial_identical(tok, corpus, tmp_path):
    paths, _ = corpus
    serial = build_token_file(paths, tok, out_dir=tmp_path/"serial", workers=1, chunk_size=1500)
    parallel = build_token_file(paths, tok, out_dir=tmp_path/"parallel", workers=3, chunk_size=1500)
    assert parallel.meta["workers"] == 3 and serial.meta["workers"] == 1
    assert serial.path.read_bytes() == parallel.path.read_bytes()


def test_cache_key_and_reuse(tok, corpus, tmp_path):
    paths, docs = corpus
    key = token_cache_key(paths, tok)
    assert key == token_cache_key(list(paths), tok)  # stable
    first = build_token_file(paths, tok, out_dir=tmp_path, workers=1)
    assert first.path.parent.name == key
    mtime = first.path.stat().st_mtime_ns
    again = build_token_file(paths, tok, out_dir=tmp_path, workers=1)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    # one changed byte in a file -> another key and another file
    changed = tmp_path/"changed.jsonl"
    raw = bytearray(paths[1].read_bytes()); raw[raw.index(b"the")] = ord("T")
    changed.write_bytes(bytes(raw))
    assert token_cache_key([paths[0], changed], tok) != key
    assert build_token_file([paths[0], changed], tok, out_dir=tmp_path, workers=1).path != first.path
    assert token_cache_key(paths[::-1], tok) != key  # order matters
    # another tokenizer -> another key
    assert token_cache_key(paths, train_tokenizer(texts(400, seed=1), vocab_size=420)) != key
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(
        [key, token_cache_key([paths[0], changed], tok)])


def test_malformed_line_raises_with_file_and_line(tok, tmp_path):
    lines = [json.dumps({"text": t}) for t in texts(20)]
    lines[6] = '{"text": 3}'
    lines[11] = '{"txt": "x"'
    bad = tmp_path/"bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    for workers in (1, 2):
        with pytest.raises(DataError) as e:
            build_token_file(bad, tok, out_dir=tmp_path/"out", workers=workers, chunk_size=50)
        assert (e.value.path, e.value.line) == (bad, 7) and str(e.value).startswith(f"{bad}:7: text")
    with pytest.warns(UserWarning, match="skipped 2 bad line"):
        tf = build_token_file(bad, tok, out_dir=tmp_path/"out", on_error="skip", workers=1)
    assert tf.meta["skipped"] == 2 and tf.meta["n_docs"] == 18
    assert [e[1] for e in tf.meta["errors"]] == [7, 12]
    good = [t for i, t in enumerate(texts(20)) if i not in (6, 11)]
    np.testing.assert_array_equal(np.asarray(tf[:]), naive(tok, good))
    with pytest.raises(DataError, match="bad.jsonl:7"):  # a cached skip-build does not hide the error
        build_token_file(bad, tok, out_dir=tmp_path/"out")


def test_interrupted_build_leaves_nothing(tok, corpus, tmp_path, monkeypatch):
    paths, _ = corpus
    calls = []
    real = shards.encode_docs

    def flaky(tokenizer, texts, eot=0):
        calls.append(1)
        if len(calls) == 3: raise KeyboardInterrupt("simulated crash mid-write")
        return real(tokenizer, texts, eot)

    monkeypatch.setattr(shards, "encode_docs", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_token_file(paths, tok, out_dir=tmp_path, workers=1, chunk_size=1000)
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []  # no half file, no temp folder
    monkeypatch.setattr(shards, "encode_docs", real)
    tf = build_token_file(paths, tok, out_dir=tmp_path, workers=1, chunk_size=1000)
    assert [p.name for p in tmp_path.iterdir()] == [tf.path.parent.name]


def test_damaged_token_file_is_refused(tok, corpus, tmp_path):
    tf = build_token_file(corpus[0], tok, out_dir=tmp_path, workers=1)
    with open(tf.path, "ab") as f: f.write(b"\0")
    with pytest.raises(ValueError, match="expected"): TokenFile(tf.path.parent)


def test_vocab_must_fit_uint16(tok, corpus, tmp_path):
    class Huge:
        def __len__(self): return 70_000
    with pytest.raises(ValueError, match="does not fit"):
        build_token_file(corpus[0], Huge(), out_dir=tmp_path)


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_packed_rows(tok, corpus, tmp_path, seq_len):
    tf = build_token_file(corpus[0], tok, out_dir=tmp_path, workers=1)
    ds = PackedDataset(tf, seq_len)
    tokens = np.asarray(tf[:]).astype(np.int64)
    assert len(ds) == (tf.n_tokens - 1) // seq_len
    for i in [0, 1, 2, len(ds) // 2, len(ds) - 2, len(ds) - 1]:
        row, nxt = ds[i], ds[min(i + 1, len(ds) - 1)]
        assert row["input_ids"].dtype == row["labels"].dtype == torch.int64
        assert row["input_ids"].shape == row["labels"].shape == (seq_len,)
        np.testing.assert_array_equal(row["input_ids"].numpy(), tokens[i*seq_len:(i + 1)*seq_len])
        np.testing.assert_array_equal(row["labels"].numpy(), tokens[i*seq_len + 1:(i + 1)*seq_len + 1])
        assert torch.equal(row["labels"][:-1], row["input_ids"][1:])  # labels are the inputs shifted by one
        if i + 1 < len(ds): assert nxt["input_ids"][0] == row["labels"][-1]  # row i+1 starts where row i's inputs end
    with pytest.raises(IndexError): ds[len(ds)]
    assert torch.equal(ds[-1]["labels"], ds[len(ds) - 1]["labels"])
    assert sum(1 for _ in ds) == len(ds)


def test_packed_dataset_pickles_and_reopens_lazily(tok, corpus, tmp_path):
    ds = PackedDataset(build_token_file(corpus[0], tok, out_dir=tmp_path, workers=1), 16)
    ds[3]; ds.tokens[:4]  # opens the file and the map
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000  # neither the map nor the descriptor is pickled, only paths and numbers
    ds2 = pickle.loads(blob)
    assert ds2.tokens._tokens is None and ds2.tokens._fd is None
    assert len(ds2) == len(ds) and torch.equal(ds2[3]["input_ids"], ds[3]["input_ids"])
    want = torch.stack([ds[i]["input_ids"] for i in range(8)])
    for context in ("spawn", "fork"):  # forked workers share the parent's open descriptor; pread needs no position
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=context)
        assert torch.equal(torch.cat([b["input_ids"] for b in loader][:2]), want)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_read_copies_without_mapping_the_file(tok, corpus, tmp_path):
    "Training rows come from pread: the token file must not appear among this process's mappings."
    tf = build_token_file(corpus[0], tok, out_dir=tmp_path, workers=1)
    ds = PackedDataset(TokenFile(tf.path), 16)
    for i in range(0, len(ds), 7): ds[i]
    assert str(tf.path) not in open("/proc/self/maps").read()
    np.testing.assert_array_equal(tf.read(10, 50), np.asarray(tf[10:50]))
    assert tf.read(7, 7).shape == (0,)
    for bad in [(-1, 3), (5, 4), (0, tf.n_tokens + 1)]:
        with pytest.raises(IndexError, match="out of range"): tf.read(*bad)


def test_too_short_for_one_row(tok, tmp_path):
    tf = build_token_file(write_jsonl(tmp_path/"one.jsonl", ["Tom"]), tok, out_dir=tmp_path/"out", workers=1)
    with pytest.raises(ValueError, match="too few"): PackedDataset(tf, 1000)


def test_read_without_pread_copies_from_the_map(tok, corpus, tmp_path, monkeypatch):
    "Windows has no os.pread: rows then come from the map, with the same tokens."
    tf = build_token_file(corpus[0], tok, out_dir=tmp_path, workers=1)
    want = tf.read(3, 40)
    monkeypatch.delattr(shards.os, "pread")
    fresh = TokenFile(tf.path)
    np.testing.assert_array_equal(fresh.read(3, 40), want)
    assert fresh._fd is None  # no file was opened for pread
