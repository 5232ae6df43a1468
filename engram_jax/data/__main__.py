"""``python -m engram_jax.data prepare CORPUS --vocab V``: prepare a corpus once (docs/data.md).

Scans and tokenizes the corpus in ``--workers`` processes into the cache (``$ENGRAM_CACHE`` or
``--cache-dir``; shared storage works), with progress and an ETA on stderr. A killed run resumes
where it stopped; a run on a prepared corpus does nothing and says so. Trials and grids then find
the entry by a stat of the corpus files, never rereading them.

Exit status: 0 done (or nothing to do), 2 bad input (a missing or empty corpus, a corpus changed
since it was prepared, a tokenizer that does not load or disagrees with --vocab, a damaged cache
entry, --workers < 1); nothing is overwritten then.
"""

from __future__ import annotations

import argparse
import json
import sys

from engram_jax.data.cache import default_cache_dir, prepare_entry
from engram_jax.data.workers import default_workers


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m engram_jax.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="scan and tokenize a corpus into the cache")
    p.add_argument("corpus", help="pystdlib | pysrc | pywheels-v1 | a directory of text files | "
                                  ".jsonl[.gz] | .parquet")
    p.add_argument("--vocab", type=int, required=True, metavar="V",
                   help="vocabulary size: the own BPE's (trained on the corpus), or the "
                        "tokenizer's (checked)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="a tokenizer.json or a Hugging Face tokenizer folder (default: train a "
                        "byte-level BPE of V tokens on the corpus)")
    p.add_argument("--eos-token", metavar="TOKEN",
                   help="the tokenizer's end-of-document token, when its config names none")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help=f"processes that scan and tokenize (default: the CPUs, here "
                        f"{default_workers()})")
    p.add_argument("--cache-dir", metavar="DIR",
                   help=f"cache root (default: $ENGRAM_CACHE or ~/.cache/engram-suite; here "
                        f"{default_cache_dir()})")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="expected share of documents held out for validation (default 0.05)")
    p.add_argument("--unit-mb", type=float, default=None, metavar="MB",
                   help="corpus megabytes per unit of work, the grain of parallelism and of "
                        "resumption (default 64; the output does not depend on it)")
    p.add_argument("--rescan", action="store_true",
                   help="read a corpus whose files changed since it was prepared again (an "
                        "unchanged content keeps its entry; a changed one gets a new entry)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    sub.add_parser("wheel-manifest", add_help=False,
                   help="write a wheel-corpus manifest from local wheels (engram_jax/data/wheels.py)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["wheel-manifest"]:  # the wheel corpora's maintenance helper (wheels.py)
        from engram_jax.data.wheels import main as wheel_manifest

        return wheel_manifest(argv[1:])
    a = _parser().parse_args(argv)
    if a.workers is not None and a.workers < 1:
        print(f"error: --workers must be at least 1, got {a.workers}", file=sys.stderr)
        return 2
    if a.unit_mb is not None and not a.unit_mb > 0:
        print(f"error: --unit-mb must be positive, got {a.unit_mb}", file=sys.stderr)
        return 2
    try:
        data, built = prepare_entry(
            a.corpus, a.vocab, cache_dir=a.cache_dir, val_fraction=a.val_fraction,
            progress=not a.quiet, tokenizer=a.tokenizer, eos_token=a.eos_token,
            workers=a.workers, rescan=a.rescan,
            unit_bytes=int(a.unit_mb * 2**20) if a.unit_mb else None)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = data.meta
    if not built:
        print(f"{a.corpus}: already prepared in {data.cache_path} (nothing to do)",
              file=sys.stderr)
    print(json.dumps({"entry": str(data.cache_path), "built": built, "corpus": data.corpus_name,
                      "fingerprint": data.fingerprint, "vocab_size": data.vocab_size,
                      "eos_id": data.eos_id, "pad_id": data.pad_id,
                      "n_train_tokens": data.n_train_tokens, "n_val_tokens": data.n_val_tokens,
                      "n_docs_train": m.get("n_docs_train"), "n_docs_val": m.get("n_docs_val"),
                      "build_seconds": m.get("build_seconds") if built else None}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
