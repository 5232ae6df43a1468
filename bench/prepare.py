"""Preparing a corpus once, measured: throughput, memory, resumption, the no-op rerun, and the
start-up of a trial on the prepared corpus.

Builds a text corpus of ``--gigabytes`` (the files of ``--source``, default ``pysrc``, copied
under distinct folder names ``copy000/``, ``copy001/`` ... until the size is reached; a second
corpus of a quarter of it for the memory comparison) in a temporary folder, then runs
``python -m engram_jax.data prepare`` as a subprocess with a fresh cache each time:

- ``prepare``: seconds, tokens/s and MB/s of corpus at each of ``--workers`` (default 1 and 2),
  and the peak resident memory of the whole process tree (the CLI and its workers: /proc sampled
  every 50 ms, RSS summed over the tree);
- ``ceiling``: the tokenizer alone (one core per process, the workers' own call: batches of
  ``ENCODE_BATCH_CHARS`` through ``encode_batch_fast``) on the same ~24 MB in 1 process and then
  in N at once: the speedup N perfectly parallel workers could reach on this machine
  (``--only ceiling`` reruns this row alone);
- ``memory-quarter``: the same at a quarter of the size (flat memory: the peak does not grow with
  the corpus);
- ``resume``: a run killed (SIGKILL to its process group) once a third of the units are
  appended, then rerun: the rerun's seconds, and its streams checked equal to an uninterrupted
  run's;
- ``noop``: a second run on the finished entry (it finds the entry by a stat of the files);
- ``trial-startup``: ``python -m engram_jax.train --preset tiny --steps 1`` on the prepared corpus
  and on ``pystdlib`` (both prepared beforehand): seconds from launch until the data is ready (its
  "[data] ... ready" line) and until the first step is done (the progress bar's "1/1"), read from
  its stderr as it arrives.

Writes ``<out>/prepare.csv`` (one row per measurement, replaced on a rerun with the same
measurement, corpus size and workers) and ``<out>/README.md``. Takes about 10-20 minutes at 1 GB on
two cores; ``--gigabytes 0.005 --unit-mb 0.5`` runs end to end in well under a minute.

    python -m bench.prepare --gigabytes 1.0 --out results/bench/prepare
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from engram_jax.data.corpus import _SKIP_DIRS as _SKIPPED

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["measurement", "corpus_mb", "workers", "vocab", "seconds", "tokens", "tokens_per_s",
           "mb_per_s", "peak_rss_mb", "note", "cpus", "git_commit", "date"]
PAGE = os.sysconf("SC_PAGE_SIZE")


def build_corpus(dest: Path, gigabytes: float, source: str) -> int:
    """Copies of the source corpus's files under copy000/, copy001/ ... up to ``gigabytes``."""
    from engram_jax.data import resolve_corpus

    files = [f for f in resolve_corpus(source).files if f.kind == "text"]
    target, total, i = int(gigabytes * 1e9), 0, 0
    while total < target:
        for f in files:
            # A path corpus skips folders named site-packages (and the like): rename them so that
            # every copied file is read.
            key = "/".join(f"{part}_" if part in _SKIPPED else part for part in f.key.split("/"))
            p = dest / f"copy{i:03d}" / key
            p.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f.path, p)
            total += f.size
            if total >= target:
                break
        i += 1
    return total


def _tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants, now."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(d))
        rss[int(d)] = int(fields[21]) * PAGE
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


class Run:
    """A subprocess whose stderr is timestamped as it arrives and whose tree RSS is sampled."""

    def __init__(self, cmd: list[str], env: dict | None = None):
        self.t0 = time.perf_counter()
        self.p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, start_new_session=True)
        self.peak, self.err, self.stamps = 0, b"", []  # stamps: (seconds, stderr so far)
        self._threads = [threading.Thread(target=self._sample, daemon=True),
                         threading.Thread(target=self._read, daemon=True)]
        for t in self._threads:
            t.start()

    def _sample(self) -> None:
        while self.p.poll() is None:
            self.peak = max(self.peak, _tree_rss(self.p.pid))
            time.sleep(0.05)

    def _read(self) -> None:
        for chunk in iter(lambda: os.read(self.p.stderr.fileno(), 65536), b""):
            self.err += chunk
            self.stamps.append((time.perf_counter() - self.t0, len(self.err)))

    def first(self, pattern: str) -> float | None:
        """Seconds from launch until stderr first matched ``pattern``."""
        m = re.search(pattern.encode(), self.err)
        if m is None:
            return None
        return next(t for t, n in self.stamps if n >= m.end())

    def kill(self) -> None:
        os.killpg(self.p.pid, signal.SIGKILL)

    def wait(self) -> tuple[int, float, dict | None]:
        out = self.p.stdout.read()
        rc = self.p.wait()
        seconds = time.perf_counter() - self.t0
        for t in self._threads:
            t.join(timeout=5)
        try:
            result = json.loads(out)
        except ValueError:
            result = None
        return rc, seconds, result


def prepare_cmd(corpus: Path, cache: Path, vocab: int, workers: int, unit_mb: float | None):
    cmd = [sys.executable, "-m", "engram_jax.data", "prepare", str(corpus), "--vocab", str(vocab),
           "--workers", str(workers), "--cache-dir", str(cache)]
    return cmd + (["--unit-mb", str(unit_mb)] if unit_mb else [])


def _row(name, mb, workers, vocab, seconds, result=None, peak=None, note=""):
    tokens = (result["n_train_tokens"] + result["n_val_tokens"]) if result else None
    return {"measurement": name, "corpus_mb": round(mb, 1), "workers": workers, "vocab": vocab,
            "seconds": round(seconds, 2) if seconds is not None else None, "tokens": tokens,
            "tokens_per_s": round(tokens / seconds) if tokens and seconds else None,
            "mb_per_s": round(mb / seconds, 2) if seconds else None,
            "peak_rss_mb": round(peak / 2**20) if peak else None, "note": note}


def _prepare(corpus, cache, vocab, workers, unit_mb, mb, name, note=""):
    r = Run(prepare_cmd(corpus, cache, vocab, workers, unit_mb))
    rc, seconds, result = r.wait()
    if rc != 0:
        raise RuntimeError(f"{name}: prepare failed ({rc}): {r.err.decode()[-2000:]}")
    print(f"[bench.prepare] {name}: {mb:.0f} MB, {workers} worker(s): {seconds:.1f} s, peak "
          f"{r.peak / 2**20:.0f} MB", file=sys.stderr)
    if result.get("built"):  # where the time went (engram_jax/data/build.py's steps)
        try:
            ph = json.loads((Path(result["entry"]) / "meta.json").read_text())["phase_seconds"]
            steps = (f"scan {ph['scan']:.1f} s, BPE {ph['bpe']:.1f} s, tokenize "
                     f"{ph['tokenize']:.1f} s")
            note = f"{note}; {steps}" if note else steps
        except (OSError, ValueError, KeyError):
            pass
    return _row(name, mb, workers, vocab, seconds, result, r.peak, note), result


# The workers' own call (engram_jax/data/shards.py tokenize_unit): batches of about
# ENCODE_BATCH_CHARS characters through encode_batch_fast (no offsets), where it exists.
_KERNEL = """
import sys, time
from tokenizers import Tokenizer
from engram_jax.data.shards import ENCODE_BATCH_CHARS
tok = Tokenizer.from_file(sys.argv[1])
tok.encode_special_tokens = True
encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
texts = [open(p, encoding="utf-8", errors="replace").read() for p in sys.argv[2:]]
batches, cur, n = [], [], 0
for x in texts:
    cur.append(x)
    n += len(x)
    if n >= ENCODE_BATCH_CHARS:
        batches.append(cur)
        cur, n = [], 0
batches.append(cur)
t = time.perf_counter()
for b in batches:
    encode(b, add_special_tokens=False)
print(time.perf_counter() - t)
"""


def kernel_scaling(tokenizer: Path, corpus: Path, n: int, mb: float = 24.0) -> dict:
    """The ceiling of the worker speedup on this machine: the tokenizer alone (one core each,
    as the workers run it) encoding the same ~``mb`` MB of the corpus in one process, then in
    ``n`` processes at once. ``seconds`` is the n-process wall time; the note gives the speedup
    n x t1 / t_n that n perfectly parallel workers could reach here."""
    files, total = [], 0
    for f in sorted(corpus.rglob("*")):
        if f.is_file():
            files.append(str(f))
            total += f.stat().st_size
            if total >= mb * 1e6:
                break
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-c", _KERNEL, str(tokenizer), *files]

    def run(k: int) -> float:
        t = time.perf_counter()
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE) for _ in range(k)]
        for p in procs:
            p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"the tokenizer kernel failed ({p.returncode})")
        return time.perf_counter() - t

    t1, tn = run(1), run(n)
    ceiling = n * t1 / tn
    print(f"[bench.prepare] ceiling: the tokenizer on {total / 1e6:.0f} MB, 1 process {t1:.1f} s, "
          f"{n} at once {tn:.1f} s: {ceiling:.2f}x", file=sys.stderr)
    row = _row("ceiling", total / 1e6, n, None, tn,
               note=f"the tokenizer alone: 1 process {t1:.2f} s, {n} at once {tn:.2f} s: "
                    f"{n}-process speedup {ceiling:.2f}x (the most {n} workers can reach here)")
    row.update(mb_per_s=round(n * total / 1e6 / tn, 2))
    return row


def ceiling_only(work: Path, *, source: str, vocab: int, n: int, gigabytes: float = 0.03) -> dict:
    """The ``ceiling`` row alone: a corpus of the source's files (30 MB, or ``--gigabytes`` if
    less) prepared with one worker for its tokenizer, then :func:`kernel_scaling` on it."""
    corpus = work / "corpus-ceiling"
    mb = build_corpus(corpus, gigabytes, source) / 1e6
    _, res = _prepare(corpus, work / "cache-ceiling", vocab, 1, None, mb, "ceiling-tokenizer")
    return kernel_scaling(Path(res["entry"]) / "tokenizer.json", corpus, n)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 24), b""):
            h.update(b)
    return h.hexdigest()


def measure(work: Path, *, gigabytes: float, source: str, vocab: int, workers: list[int],
            unit_mb: float | None) -> list[dict]:
    big, small = work / "corpus", work / "corpus-quarter"
    mb = build_corpus(big, gigabytes, source) / 1e6
    mb_small = build_corpus(small, gigabytes / 4, source) / 1e6
    rows, results = [], {}
    for w in workers:
        row, results[w] = _prepare(big, work / f"cache-w{w}", vocab, w, unit_mb, mb, "prepare")
        rows.append(row)
    w = max(workers)
    if len(workers) > 1:
        rows.append(kernel_scaling(Path(results[min(workers)]["entry"]) / "tokenizer.json", big, w))
    rows.append(_prepare(small, work / "cache-quarter", vocab, w, unit_mb, mb_small,
                         "memory-quarter", "a quarter of the corpus: compare peak_rss_mb")[0])

    # resume: kill once a third of the units are appended, then rerun
    from engram_jax.data import resolve_corpus, shards

    n_units = len(shards.plan_units(resolve_corpus(str(big)).files,
                                    int(unit_mb * 2**20) if unit_mb else None))
    cache = work / "cache-resume"
    r = Run(prepare_cmd(big, cache, vocab, w, unit_mb))
    killed_at = None
    while r.p.poll() is None:
        try:
            prog = next(cache.glob(".*.partial/progress.json"), None)
            appended = json.loads(prog.read_text())["appended"] if prog else 0
        except (OSError, ValueError):
            appended = 0
        if appended >= max(1, n_units // 3):
            killed_at = time.perf_counter() - r.t0
            r.kill()
            break
        time.sleep(0.02)
    r.wait()
    if killed_at is None:
        rows.append(_row("resume", mb, w, vocab, None, note="finished before the kill"))
    else:
        row, res = _prepare(big, cache, vocab, w, unit_mb, mb, "resume")
        same = _sha(Path(res["entry"]) / "train.npy") == _sha(
            Path(results[w]["entry"]) / "train.npy")
        row["note"] = (f"rerun after SIGKILL at {killed_at:.1f} s; streams "
                       f"{'equal to' if same else 'DIFFER FROM'} the uninterrupted run's")
        rows.append(row)

    # no-op rerun
    row, res = _prepare(big, work / f"cache-w{w}", vocab, w, unit_mb, mb, "noop")
    row.update(tokens=None, tokens_per_s=None, mb_per_s=None,
               note="second run on the finished entry" + ("" if not res["built"] else ": REBUILT"))
    rows.append(row)

    # trial start-up, on the prepared corpus and on pystdlib (prepared first, same cache)
    cache = work / f"cache-w{w}"
    _prepare("pystdlib", cache, vocab, w, None, 0, "pystdlib")
    for name, corpus, cmb in (("trial-startup", big, mb), ("trial-startup-pystdlib", "pystdlib",
                                                           None)):
        env = {**os.environ, "ENGRAM_CACHE": str(cache)}
        r = Run([sys.executable, "-m", "engram_jax.train", "--preset", "tiny", "--corpus",
                 str(corpus), "--steps", "1", "--out", str(work / f"run-{name}"), "--set",
                 f"vocab_size={vocab}", "--set", "eval_batches=1", "--set",
                 "final_eval_tokens=0", "--compile-cache", "off"], env=env)
        rc, seconds, _ = r.wait()
        if rc != 0:
            raise RuntimeError(f"{name}: training failed: {r.err.decode()[-2000:]}")
        data = r.first(r"\[data\] .* ready in")
        step = r.first(r"train: [^\r\n]*1/1")
        rows.append(_row(name, cmb or 0, 1, vocab, step, peak=r.peak,
                         note=f"launch to data ready {data:.2f} s, to the first step "
                              f"{step:.2f} s, to exit {seconds:.2f} s"))
        rows[-1].update(tokens_per_s=None, mb_per_s=None)
    return rows


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write(rows: list[dict], out: Path, args: argparse.Namespace) -> None:
    """Merge the rows into ``prepare.csv`` (same measurement, size and workers replaced) and
    write the README."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = {"cpus": os.cpu_count(), "git_commit": _git_commit(),
             "date": datetime.date.today().isoformat()}
    rows = [{**r, **stamp} for r in rows]
    path = out / "prepare.csv"
    old = list(csv.DictReader(path.open())) if path.exists() else []
    key = lambda r: (r["measurement"], str(r["corpus_mb"]), str(r["workers"]))  # noqa: E731
    new_keys = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new_keys] + rows
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(merged)
    table = "\n".join("| " + " | ".join(str(r.get(c, "")) for c in COLUMNS[:10]) + " |"
                      for r in merged)
    (out / "README.md").write_text(f"""# Preparing a corpus once (`python -m bench.prepare`)

`python -m bench.prepare --gigabytes {args.gigabytes} --source {args.source} --vocab {args.vocab}
--workers {','.join(map(str, args.workers))}` (see `bench/prepare.py`): a corpus of the source's
files copied under distinct folder names, prepared with `python -m engram_jax.data prepare` and a
fresh cache each time, on a machine of {os.cpu_count()} CPUs (commit {stamp['git_commit']},
{stamp['date']}). Anything else running on the machine slows it; say what in the commit.

| {' | '.join(COLUMNS[:10])} |
|{'---|' * 10}
{table}

- `prepare`: the whole preparation (scan, BPE training on the sample, tokenization) at each
  number of workers; tokens = train + validation tokens; MB/s of corpus.
- `ceiling`: the tokenizer alone, one core each and called as the workers call it (batches of
  about a million characters through `encode_batch_fast`), on the same ~24 MB in one process and
  then in as many processes at once as the largest worker count: the speedup that many perfectly
  parallel workers could reach on this machine (the workers' speedup is read against it;
  `--only ceiling` reruns this row alone).
- `memory-quarter`: the same at a quarter of the corpus: the peak resident memory of the
  process tree (the CLI and its workers) should be about that of the full size.
- `resume`: the rerun after a SIGKILL once a third of the units were appended.
- `noop`: a second run on the finished entry (a stat of the files, no reading).
- `trial-startup*`: `python -m engram_jax.train --preset tiny --steps 1` on the prepared corpus
  and on `pystdlib`: `seconds` is launch to the first step; the note gives launch to data ready.
""")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gigabytes", type=float, default=1.0, help="corpus size (default 1.0)")
    ap.add_argument("--source", default="pysrc", help="corpus whose files are copied (pysrc)")
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary (default 2048)")
    ap.add_argument("--workers", default="1,2", help="worker counts to time (default 1,2)")
    ap.add_argument("--unit-mb", type=float, default=None,
                    help="megabytes per unit of work (default: the CLI's, 64)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "prepare"))
    ap.add_argument("--work", default=None,
                    help="folder for the corpora and caches (default: a temporary one, removed)")
    ap.add_argument("--only", choices=["ceiling"], default=None,
                    help="rerun one measurement alone and merge its row: ceiling (a minute: the "
                         "tokenizer of a 30 MB preparation, as the workers call it)")
    a = ap.parse_args(argv)
    a.workers = [int(w) for w in str(a.workers).split(",")]
    if a.gigabytes <= 0 or min(a.workers) < 1:
        ap.error("--gigabytes must be positive and every worker count >= 1")
    with tempfile.TemporaryDirectory(prefix="bench-prepare-", dir=a.work) as work:
        if a.only == "ceiling":
            rows = [ceiling_only(Path(work), source=a.source, vocab=a.vocab, n=max(a.workers),
                                 gigabytes=min(a.gigabytes, 0.03))]
        else:
            rows = measure(Path(work), gigabytes=a.gigabytes, source=a.source, vocab=a.vocab,
                           workers=a.workers, unit_mb=a.unit_mb)
    write(rows, Path(a.out), a)
    for r in rows:
        print(json.dumps({k: r[k] for k in COLUMNS[:10]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
