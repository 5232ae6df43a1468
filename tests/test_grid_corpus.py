"""The grid loader's corpus and tokenizer checks (sweeps/grid.py ``_check_corpus``,
``_check_tokenizer``) and the continuation check of sweeps.run on a prepared corpus."""

import sys

import pytest

from sweeps.grid import GridError, load_grid


def _grid(tmp_path, corpus):
    p = tmp_path / "g.yaml"
    p.write_text(f"budget: smoke\ncorpus: {corpus}\n")
    return p


def test_missing_corpus_is_refused(tmp_path):
    with pytest.raises(GridError, match="corpus: corpus .*not found"):
        load_grid(_grid(tmp_path, tmp_path / "nope"))


def test_corpus_check_does_not_skip_on_import_error(tmp_path, monkeypatch):
    """If the input pipeline cannot be imported the check fails loudly instead of passing."""
    monkeypatch.setitem(sys.modules, "engram_jax.data", None)  # makes the import raise
    with pytest.raises(ImportError):
        load_grid(_grid(tmp_path, tmp_path / "nope"))


MICRO = """\
name: micro
base: smoke
model: {{seq_len: 32}}
rho: [1.0, 0.6]
seeds: [0]
steps: 4
batch_size: 4
corpus: {corpus}
resources: {{cpu: 1, gpu: 0}}
"""


def test_continuing_a_grid_on_another_corpus_is_refused(tmp_path, capsys, monkeypatch):
    """A grid whose finished rows were trained on a corpus with another fingerprint is not
    continued: exit 2 before any work, naming both fingerprints; the same fingerprint continues."""
    import json

    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))

    from engram_jax.data import resolve_corpus
    from sweeps.results import LEAD_COLUMNS, build_rows, to_csv
    from sweeps.run import corpus_changed, main
    from sweeps.trainable import spec_to_config

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(f"document {i}\n" * 20)
    now = resolve_corpus(str(corpus)).fingerprint
    path = tmp_path / "micro.yaml"
    path.write_text(MICRO.format(corpus=corpus))
    grid = load_grid(path)
    out = tmp_path / "results" / "micro"
    out.mkdir(parents=True)
    (out / "grid.json").write_text(json.dumps([spec_to_config(t) for t in grid.trials]))

    def write_rows(fingerprint):
        rows = build_rows(grid, {}, {}, "x")
        rows[0].update(status="ok", val_loss=1.0, corpus_fingerprint=fingerprint)
        (out / "runs.csv").write_text(to_csv(rows, LEAD_COLUMNS))

    write_rows(now)
    assert corpus_changed(out, grid) == ""
    write_rows("86a1d98c" + "0" * 56)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([str(path), "--results", str(tmp_path / "results"), "--tracking", "none"]) == 2
    err = capsys.readouterr().err
    assert f"fingerprint 86a1d98c{'0' * 56}" in err and f"resolves to fingerprint {now}" in err
    assert "'pysrc' depends on the installed packages" in err and "'pywheels-v1' does not" in err
    assert "--force" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _tokenizer(path, vocab=400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    import random

    rnd = random.Random(0)
    text = [" ".join("".join(rnd.choice("abcdefghijklmnop") for _ in range(rnd.randint(1, 6)))
                     for _ in range(200)) for _ in range(40)]
    tok.train_from_iterator(text,
                            trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                                special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return path


def test_grid_tokenizer_is_loaded_and_checked_against_every_trial(tmp_path, monkeypatch):
    from sweeps.trainable import spec_to_config

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text\n" * 10)
    (corpus / "b.txt").write_text("more text\n" * 10)
    tok = _tokenizer(tmp_path / "tok.json")
    body = f"name: t\nbase: smoke\nrho: [1.0, 0.6]\nseeds: [0]\nsteps: 2\ncorpus: {corpus}\n"
    p = tmp_path / "g.yaml"
    p.write_text(body + f"model: {{vocab_size: 400}}\ntokenizer: {tok}\n")
    g = load_grid(p)
    assert g.tokenizer == str(tok) and all(t.tokenizer == str(tok) for t in g.trials)
    assert spec_to_config(g.trials[0])["tokenizer"] == str(tok)
    assert "tokenizer" not in spec_to_config(load_grid(_grid(tmp_path, corpus)).trials[0])

    monkeypatch.setenv("TOK_DIR", str(tmp_path))
    p.write_text(body + "model: {vocab_size: 400}\n"
                 "tokenizer: {path: $TOK_DIR/tok.json, eos_token: <|endoftext|>}\n")
    g = load_grid(p)
    assert g.trials[0].tokenizer == str(tok) and g.trials[0].eos_token == "<|endoftext|>"
    assert spec_to_config(g.trials[0])["eos_token"] == "<|endoftext|>"

    p.write_text(body + f"tokenizer: {tok}\n")  # smoke's vocabulary is 512
    with pytest.raises(GridError, match=r"tokenizer .* 400 ids but the model's vocab_size is 512"):
        load_grid(p)
    (tmp_path / "bad.json").write_text("{")
    p.write_text(body + f"model: {{vocab_size: 400}}\ntokenizer: {tmp_path / 'bad.json'}\n")
    with pytest.raises(GridError, match="tokenizer: tokenizer .*does not load"):
        load_grid(p)
    p.write_text(body + "tokenizer: $UNSET_TOKENIZER_DIR/tok.json\n")
    monkeypatch.delenv("UNSET_TOKENIZER_DIR", raising=False)
    with pytest.raises(GridError, match="UNSET_TOKENIZER_DIR is not set"):
        load_grid(p)


def test_a_prepared_corpus_is_checked_by_a_stat_of_its_files(tmp_path, monkeypatch):
    """Grid load and the continuation check read the manifest, never the files; a changed file
    fails both, naming it."""
    import json

    from engram_jax.data import Corpus, corpus_fingerprint, prepare
    from sweeps.results import LEAD_COLUMNS, build_rows, to_csv
    from sweeps.run import corpus_changed
    from sweeps.trainable import spec_to_config

    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"document {i} with words in it\n" * 40)
    fp = prepare(str(corpus), 260, progress=False).fingerprint
    path = tmp_path / "micro.yaml"
    path.write_text(MICRO.format(corpus=corpus))

    def no_reading(*a, **k):
        raise AssertionError("a prepared corpus is not read")

    with monkeypatch.context() as m:
        m.setattr(Corpus, "content_hashes", no_reading)
        m.setattr("engram_jax.data.corpus.iter_files", no_reading)
        grid = load_grid(path)
        assert corpus_fingerprint(str(corpus)) == fp
        out = tmp_path / "results" / "micro"
        out.mkdir(parents=True)
        (out / "grid.json").write_text(json.dumps([spec_to_config(t) for t in grid.trials]))
        rows = build_rows(grid, {}, {}, "x")
        rows[0].update(status="ok", val_loss=1.0, corpus_fingerprint=fp)
        (out / "runs.csv").write_text(to_csv(rows, LEAD_COLUMNS))
        assert corpus_changed(out, grid) == ""
    (corpus / "doc2.txt").write_text("edited\n")
    with pytest.raises(GridError, match=r"corpus: corpus .* changed since it was prepared.*doc2"):
        load_grid(path)
    why = corpus_changed(out, grid)
    assert why.startswith("refusing to continue grid 'micro'") and "doc2.txt" in why
