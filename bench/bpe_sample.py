"""How large a sample the own BPE needs: the token count of the validation split against the
characters the tokenizer was trained on.

The own BPE of vocabulary V trains on ``bpe_sample_chars(V) = max(8M, 1000 V)`` characters of
train documents (engram_jax/data/tokenizer.py): the first 8M-character rule, unchanged up to
V = 8,000, grows with V beyond. This measures whether that is enough: it scans the corpus once
(the same hash-ordered selection as a preparation, ``shards.ScanMerge``), trains the BPE on
``--multipliers`` times the rule (default 0.25, 0.5, 1, 2), tokenizes the validation split with
each and writes its token count; when the count changes by well under 1% from 1x to 2x, the rule's
sample is large enough at that V. A multiplier whose sample exceeds the train split is marked
saturated (the whole split is used).

    python -m bench.bpe_sample --corpus pywheels-v1 --vocab 8192 --out results/bench/bpe-sample

Writes ``<out>/bpe_sample.csv`` (rows replaced by corpus, V and multiplier) and ``<out>/README.md``.
At V = 8192 on pywheels-v1 it trains four tokenizers of up to 16M characters and tokenizes 7M
characters four times: some minutes on two cores.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["corpus", "vocab", "multiplier", "sample_chars", "sample_docs", "saturated",
           "train_chars", "bpe_seconds", "val_chars", "val_tokens", "chars_per_token",
           "tokens_vs_1x", "fingerprint", "date"]


def measure(corpus: str, vocab: int, multipliers: list[float], *, val_fraction: float = 0.05,
            rule_chars: int | None = None) -> list[dict]:
    from engram_jax.data import resolve_corpus, shards
    from engram_jax.data.tokenizer import bpe_sample_chars, train_bpe

    c = resolve_corpus(corpus)
    units = shards.plan_units(c.files)
    rule = rule_chars or bpe_sample_chars(vocab)
    budgets = {m: int(m * rule) for m in multipliers}
    merge = shards.ScanMerge(len(units), max(budgets.values()))
    for i, unit in enumerate(units):
        merge.add(shards.scan_unit(i, unit, val_fraction, max(budgets.values())))
    scan = merge.result(corpus)
    exclude = merge.lo[1] if scan["force_val"] is not None else None
    train_chars = scan["n_chars"]  # an upper bound used only to flag saturation
    val_texts = [t for k, t in c.documents() if (shards.unit_hash(k) < val_fraction
                                                 or k == scan["force_val"])
                 and k != scan["force_train"]]
    val_chars = sum(map(len, val_texts))
    rows = []
    for m, budget in sorted(budgets.items()):
        merge.sample.budget = budget
        chosen = merge.sample.select(exclude)
        keys = {k for _, _, _, k in chosen}
        n_chars = sum(n for _, _, n, _ in chosen)
        t0 = time.perf_counter()
        tok = train_bpe((t for k, t in c.documents() if k in keys), vocab)
        seconds = time.perf_counter() - t0
        n_tokens = sum(len(e.ids) for e in tok.encode_batch(val_texts, add_special_tokens=False))
        rows.append({"corpus": corpus, "vocab": vocab, "multiplier": m, "sample_chars": n_chars,
                     "sample_docs": len(keys), "saturated": n_chars < budget,
                     "train_chars": train_chars, "bpe_seconds": round(seconds, 1),
                     "val_chars": val_chars, "val_tokens": n_tokens,
                     "chars_per_token": round(val_chars / n_tokens, 4),
                     "fingerprint": c.fingerprint[:12],
                     "date": datetime.date.today().isoformat()})
        print(f"[bench.bpe_sample] {corpus} V={vocab} x{m}: {n_chars:,} chars -> {n_tokens:,} "
              "val tokens", file=sys.stderr)
    ref = next((r["val_tokens"] for r in rows if r["multiplier"] == 1), None)
    for r in rows:
        r["tokens_vs_1x"] = round(r["val_tokens"] / ref, 5) if ref else None
    return rows


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bpe_sample.csv"
    old = list(csv.DictReader(path.open())) if path.exists() else []
    key = lambda r: (r["corpus"], str(r["vocab"]), str(float(r["multiplier"])))  # noqa: E731
    new = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new] + rows
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(merged)
    cols = ["corpus", "vocab", "multiplier", "sample_chars", "saturated", "val_tokens",
            "chars_per_token", "tokens_vs_1x"]
    table = "\n".join("| " + " | ".join(str(r[c]) for c in cols) + " |" for r in merged)
    (out / "README.md").write_text(f"""# The own BPE's sample size (`python -m bench.bpe_sample`)

The own BPE of vocabulary V trains on `max(8M, 1000 V)` characters of train documents (1x
below); `bench/bpe_sample.py` trains it on multiples of that and counts the tokens of the
validation split. A count that barely moves from 1x to 2x means the rule's sample is enough.

| {' | '.join(cols)} |
|{'---|' * len(cols)}
{table}
""")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bpe_sample", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="pywheels-v1")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--multipliers", default="0.25,0.5,1,2")
    ap.add_argument("--rule-chars", type=int, default=None,
                    help="the 1x sample in characters (default: the rule, max(8M, 1000 V))")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "bpe-sample"))
    a = ap.parse_args(argv)
    rows = measure(a.corpus, a.vocab, [float(m) for m in a.multipliers.split(",")],
                   rule_chars=a.rule_chars)
    write(rows, Path(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
