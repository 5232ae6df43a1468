"""A user's tokenizer (engram_jax/data/tokenizer.py): loading, EOS and pad ids, the cache key, the
token streams and the token compression, for byte-level BPE, SentencePiece-style (Metaspace)
and WordPiece tokenizers built here with the ``tokenizers`` library (no download)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engram_jax.config import EngramConfig
from engram_jax.data import TokenizerError, load_tokenizer_spec, make_hash_fn, prepare
from engram_jax.data.shards import unit_hash
from engram_jax.hashing import NgramHasher, compress, compression_table

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "so", "pe", "di", "fu", "ba", "zo"]


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(150)]
        words = [w.capitalize() if rng.random() < 0.2 else w for w in words]
        out.append(f"Doc {i}: " + " ".join(words) + ".\n")
    return out


def build(kind: str, vocab: int = 400) -> Tokenizer:
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                      special_tokens=["<pad>", "<s>", "<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                      special_tokens=["<unk>", "<pad>", "<s>", "</s>"])
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab, show_progress=False,
                                            special_tokens=["[PAD]", "[UNK]", "[SEP]"])
    tok.train_from_iterator(texts(30, seed=7), trainer)
    return tok


def save(tok: Tokenizer, folder, config: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i, t in enumerate(texts(24, seed=1)):
        (d / f"t{i:02d}.txt").write_text(t)
    return d


# kind -> (tokenizer_config.json or None, --eos-token, expected eos, expected pad)
CASES = {
    "bytelevel": (None, None, "<|endoftext|>", "<|endoftext|>"),
    "metaspace": ({"eos_token": "</s>", "pad_token": {"content": "<pad>"}}, None, "</s>", "<pad>"),
    "wordpiece": (None, "[SEP]", "[SEP]", "[SEP]"),
}
# word-initial and word-internal forms of the same text, in each tokenizer's spelling
PAIRS = {"bytelevel": ("\u0120{}", "{}"), "metaspace": ("\u2581{}", "{}"),
         "wordpiece": ("{}", "##{}")}


@pytest.mark.parametrize("kind", list(CASES))
def test_user_tokenizer_streams_ids_and_compression(kind, corpus, tmp_path):
    config, eos_arg, eos, pad = CASES[kind]
    tok = build(kind)
    path = save(tok, tmp_path / kind, config)
    spec = load_tokenizer_spec(path, eos_token=eos_arg)
    V = spec.vocab_size
    assert (spec.eos_token, spec.pad_token) == (eos, pad)
    assert spec.eos_id == tok.token_to_id(eos) != 0 and spec.pad_id == tok.token_to_id(pad)

    d = prepare(str(corpus), V, cache_dir=tmp_path / "cache", val_fraction=0.25, progress=False,
                tokenizer=path, eos_token=eos_arg)
    assert (d.eos_id, d.pad_id, d.vocab_size) == (spec.eos_id, spec.pad_id, V)
    assert d.tokenizer.to_str() == tok.to_str()
    want = {"train": [], "val": []}
    tok.encode_special_tokens = True
    for f in sorted(corpus.iterdir()):
        key = f.name
        ids = tok.encode(f.read_text(), add_special_tokens=False).ids + [spec.eos_id]
        want["val" if unit_hash(key) < 0.25 else "train"] += ids
    np.testing.assert_array_equal(d.train_tokens, want["train"])
    np.testing.assert_array_equal(d.val_tokens, want["val"])

    lookup, v_comp = d.compression()
    vocab = tok.get_vocab()
    merged = 0
    for syl in SYLLABLES:
        a, b = (p.format(syl) for p in PAIRS[kind])
        if a in vocab and b in vocab:
            assert lookup[vocab[a]] == lookup[vocab[b]], (a, b)
            merged += 1
        cap = syl.capitalize()
        if cap in vocab and syl in vocab:
            assert lookup[vocab[cap]] == lookup[vocab[syl]], (cap, syl)
            merged += 1
    assert merged >= 2 and v_comp < V

    engram = EngramConfig(layer_ids=(0,), max_ngram=3, heads_per_ngram=2, d_head=8,
                          table_sizes=(101, 211), seed=3)
    ids = np.asarray(d.train_tokens[:40], np.int64).reshape(2, 20)
    ref = NgramHasher(v_comp, engram.table_sizes, 3, 2, (0,), int(lookup[spec.pad_id]), 3)
    np.testing.assert_array_equal(make_hash_fn(engram, d, V)(ids)[0],
                                  ref(compress(lookup, ids))[0])


def test_the_tokenizer_is_part_of_the_cache_key(corpus, tmp_path):
    a = save(build("bytelevel"), tmp_path / "a")
    b = save(build("bytelevel", 401), tmp_path / "b")  # another file and vocabulary
    kw = dict(cache_dir=tmp_path / "cache", progress=False)
    da = prepare(str(corpus), 400, tokenizer=a, **kw)
    db = prepare(str(corpus), 401, tokenizer=b, **kw)
    own = prepare(str(corpus), 400, **kw)
    assert len({da.cache_path, db.cache_path, own.cache_path}) == 3
    assert da.meta["tokenizer_sha256"] != db.meta["tokenizer_sha256"]
    assert own.eos_id == 0 and "tokenizer_sha256" not in own.meta
    assert prepare(str(corpus), 400, tokenizer=a, **kw).cache_path == da.cache_path


def test_eos_and_pad_detection_and_errors(tmp_path):
    tok = build("metaspace")
    plain = save(tok, tmp_path / "plain")
    assert load_tokenizer_spec(plain).eos_token == "</s>"  # a known end token
    assert load_tokenizer_spec(plain / "tokenizer.json").pad_id == tok.token_to_id("</s>")
    cfg = save(tok, tmp_path / "cfg", {"eos_token": "<s>"})
    assert load_tokenizer_spec(cfg).eos_token == "<s>"
    assert load_tokenizer_spec(cfg, eos_token="<pad>").eos_token == "<pad>"  # the flag wins
    with pytest.raises(TokenizerError, match="'<nope>' is not in its vocabulary"):
        load_tokenizer_spec(cfg, eos_token="<nope>")
    bad_cfg = save(tok, tmp_path / "bad", {"eos_token": "</s>", "pad_token": "<missing>"})
    with pytest.raises(TokenizerError, match="pad_token"):
        load_tokenizer_spec(bad_cfg)
    wp = save(build("wordpiece"), tmp_path / "wp")
    with pytest.raises(TokenizerError, match="--eos-token"):
        load_tokenizer_spec(wp)
    with pytest.raises(TokenizerError, match="vocab_size is 512.*vocab_size=400"):
        load_tokenizer_spec(plain, vocab_size=512)
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer_spec(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer_spec(tmp_path / "empty")
    (tmp_path / "junk.json").write_text('{"model": 1}')
    with pytest.raises(TokenizerError, match="does not load"):
        load_tokenizer_spec(tmp_path / "junk.json")


def _first_version_compression(tokenizer):
    """engram_jax/hashing.py's compression_table before WordPiece support, copied."""
    from engram_jax.hashing import _normalizer

    norm = _normalizer()
    key2new, lookup = {}, np.empty(tokenizer.get_vocab_size(with_added_tokens=True), np.int64)
    for tid in range(len(lookup)):
        text = tokenizer.decode([tid], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tokenizer.id_to_token(tid)
        else:
            normed = norm.normalize_str(text)
            key = normed if normed else text
        lookup[tid] = key2new.setdefault(key, len(key2new))
    return lookup, len(key2new)


def test_compression_of_byte_level_bpe_is_unchanged():
    from engram_jax.data.tokenizer import train_bpe

    tok = train_bpe(iter(texts(20)), 400)
    got, want = compression_table(tok), _first_version_compression(tok)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == want[1]


def test_train_cli_refuses_a_tokenizer_of_another_vocabulary(tmp_path, capsys, corpus):
    from engram_jax import train

    path = save(build("bytelevel"), tmp_path / "tok")
    out = tmp_path / "run"
    rc = train.main(["--preset", "tiny", "--corpus", str(corpus), "--tokenizer", str(path),
                     "--out", str(out), "--no-progress", "--host-malloc", "default"])
    err = capsys.readouterr().err
    assert rc == 2 and "vocabulary of 400 ids but the model's vocab_size is 512" in err, err
    assert "--set vocab_size=400" in err and not out.exists()


@pytest.mark.slow
def test_a_trial_trains_on_a_user_tokenizer(tmp_path, corpus, monkeypatch):
    from engram_jax.config import TrainConfig, preset
    from engram_jax.train import run_trial

    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    path = save(build("metaspace"), tmp_path / "tok", {"eos_token": "</s>", "pad_token": "<pad>"})
    cfg = preset("tiny").with_overrides({"vocab_size": 400, "seq_len": 32})
    tcfg = TrainConfig(steps=4, batch_size=4, eval_every=2, eval_batches=1, log_every=2,
                       warmup_steps=1, final_eval_tokens=0)
    rec = run_trial(cfg, tcfg, corpus=str(corpus), out_dir=tmp_path / "run", progress=False,
                    tokenizer=str(path))
    assert rec["status"] == "ok" and rec["tokenizer"] == str(path)
    assert len(rec["tokenizer_sha256"]) == 64 and np.isfinite(rec["val_loss"])
    spec = json.loads((tmp_path / "run" / "config.json").read_text())
    assert spec["tokenizer"] == str(path)
