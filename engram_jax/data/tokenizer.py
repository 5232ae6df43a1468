"""Tokenizers: the suite's own byte-level BPE, or any Hugging Face ``tokenizers`` tokenizer.

docs/design.md section 2 trains a byte-level BPE on the train split of each corpus; a user may
instead bring a tokenizer (``--tokenizer PATH``, ``tokenizer: PATH`` in a grid). PATH is a
``tokenizer.json`` or a local Hugging Face tokenizer folder (``tokenizer.json`` plus optional
``tokenizer_config.json`` / ``special_tokens_map.json``).

- **Own BPE.** ByteLevel pre-tokenizer and decoder, ``<|endoftext|>`` as id 0 (end of document and
  pad), trained on a hash-ordered sample of the train documents of ``bpe_sample_chars(V) =
  max(8M, 1000 x V)`` characters (``shards.py`` says how the sample is chosen). Every vocabulary up
  to 8,000 keeps the 8M-character sample of the first versions, so their tokenizers and token
  streams are unchanged; larger vocabularies see proportionally more text (bench/bpe_sample.py
  measures the token count against the sample size).
- **A user's tokenizer.** Its end-of-document id comes from ``eos_token`` in
  ``tokenizer_config.json`` (or ``special_tokens_map.json``), else from the first known end token
  in its vocabulary (:data:`KNOWN_EOS`), else the caller must name it (``--eos-token``). The pad id
  (positions before a sequence's start in the n-gram hashing) is ``pad_token`` of the config, else
  the EOS id. Its vocabulary size is the largest id + 1 and must equal the model's ``vocab_size``.

Text is always encoded as text: a document that happens to contain ``<|endoftext|>`` is not split
there (``encode_special_tokens``), and no special tokens are added; each document is followed by
the EOS id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 0
# End-of-document tokens of common tokenizer families (GPT-2/Qwen, Llama 2/T5/Mistral, Gemma,
# Llama 3, DeepSeek), looked up in this order when the tokenizer's config names none.
KNOWN_EOS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")
BPE_MIN_SAMPLE_CHARS = 8_000_000
BPE_CHARS_PER_TOKEN = 1000


class TokenizerError(ValueError):
    """A tokenizer that cannot be used: it does not load, has no end-of-document token, or its
    vocabulary differs from the model's."""


def bpe_sample_chars(vocab_size: int) -> int:
    """Characters of train text the own BPE of vocabulary V is trained on: max(8M, 1000 V)."""
    return max(BPE_MIN_SAMPLE_CHARS, BPE_CHARS_PER_TOKEN * int(vocab_size))


def train_bpe(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``<|endoftext|>`` as id 0 (it may stop short of vocab_size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    assert tok.token_to_id(EOS_TOKEN) == EOS_ID
    # Text that happens to contain "<|endoftext|>" is ordinary text, not a document boundary.
    tok.encode_special_tokens = True
    return tok


def vocab_size_of(tok: Tokenizer) -> int:
    """Largest token id + 1 (the embedding rows a model needs), added tokens included."""
    vocab = tok.get_vocab(with_added_tokens=True)
    return max(vocab.values()) + 1 if vocab else 0


@dataclass(frozen=True, slots=True)
class TokenizerSpec:
    """A user's tokenizer, loaded and checked.

    Attributes:
      path: the ``tokenizer.json`` file.
      sha256: SHA-256 of that file (part of the cache key).
      vocab_size: largest id + 1.
      eos_token, eos_id: the end-of-document token.
      pad_token, pad_id: the pad token (the EOS token unless the config names one).
      source: what was given (the file or the folder).
    """

    path: Path
    sha256: str
    vocab_size: int
    eos_token: str
    eos_id: int
    pad_token: str
    pad_id: int
    source: str

    def load(self) -> Tokenizer:
        """The tokenizer, set to encode special-token strings in documents as text."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self.path))
        tok.encode_special_tokens = True
        return tok

    def cache_id(self) -> str:
        """What the cache key holds of this tokenizer."""
        return f"file/{self.sha256}/eos={self.eos_id}/pad={self.pad_id}"


def _token_content(value) -> str | None:
    """A token named in a tokenizer config: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _config_tokens(folder: Path) -> dict[str, str]:
    """eos_token / pad_token named by the folder's tokenizer_config.json (or special_tokens_map)."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        p = folder / name
        if not p.is_file():
            continue
        try:
            cfg = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise TokenizerError(f"tokenizer config {p} is not readable JSON: {e}") from None
        for key in ("eos_token", "pad_token"):
            tok = _token_content(cfg.get(key)) if isinstance(cfg, dict) else None
            if tok is not None:
                out[key] = tok
    return out


def load_tokenizer_spec(path: str | Path, *, eos_token: str | None = None,
                        vocab_size: int | None = None) -> TokenizerSpec:
    """Load and check a user's tokenizer (a ``tokenizer.json`` or a Hugging Face folder).

    Args:
      path: the file or folder.
      eos_token: the end-of-document token, overriding the config and the known names.
      vocab_size: the model's vocabulary size; checked against the tokenizer's when given.

    Raises:
      TokenizerError: the tokenizer does not load, names an EOS or pad token it does not have,
        has none of the known end tokens, or its vocabulary size differs from ``vocab_size``.
    """
    from tokenizers import Tokenizer

    given = Path(path).expanduser()
    if not given.exists():
        raise TokenizerError(f"tokenizer {str(path)!r} not found: give a tokenizer.json file or a "
                             "folder holding one")
    file = given / "tokenizer.json" if given.is_dir() else given
    if not file.is_file():
        raise TokenizerError(f"tokenizer folder {given} has no tokenizer.json (only the fast "
                             "tokenizers' JSON format is read; convert a SentencePiece .model with "
                             "transformers' AutoTokenizer(...).save_pretrained first)")
    try:
        data = file.read_bytes()
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
        raise TokenizerError(f"tokenizer {file} does not load: {e}") from None
    named = _config_tokens(file.parent) if given.is_dir() or file.name == "tokenizer.json" else {}
    vocab = vocab_size_of(tok)

    def token_id(token: str, what: str) -> int:
        tid = tok.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"tokenizer {file}: its {what} {token!r} is not in its vocabulary")
        return tid

    if eos_token is not None:
        eos = eos_token
        eos_id = token_id(eos, "EOS token (--eos-token)")
    elif "eos_token" in named:
        eos = named["eos_token"]
        eos_id = token_id(eos, "eos_token (tokenizer_config.json)")
    else:
        found = [t for t in KNOWN_EOS if tok.token_to_id(t) is not None]
        if not found:
            raise TokenizerError(
                f"tokenizer {file} names no end-of-document token and has none of "
                f"{', '.join(KNOWN_EOS)}: pass --eos-token TOKEN (or eos_token in a tokenizer "
                "grid's tokenizer: {path: ..., eos_token: ...}, or in tokenizer_config.json)")
        eos = found[0]
        eos_id = tok.token_to_id(eos)
    pad = named.get("pad_token", eos)
    pad_id = token_id(pad, "pad_token (tokenizer_config.json)")
    if vocab_size is not None and vocab != vocab_size:
        raise TokenizerError(
            f"tokenizer {file} has a vocabulary of {vocab:,} ids but the model's vocab_size is "
            f"{vocab_size:,}: set the model's vocab_size to {vocab} (--set vocab_size={vocab}, or "
            f"model: {{vocab_size: {vocab}}} in a grid)")
    return TokenizerSpec(file.resolve(), hashlib.sha256(data).hexdigest(), vocab, eos, eos_id,
                         pad, pad_id, str(path))
