"""The persistent compilation cache: where it lives, that trials fill it, and that a program read
back from it computes exactly what a fresh compilation computes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engram_jax import compile_cache

REPO = Path(__file__).resolve().parent.parent

# A train step of the smoke model on a fixed batch: its loss and a parameter checksum after 3 steps.
PROGRAM = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from engram_jax import compile_cache
from engram_jax.config import TrainConfig, preset
from engram_jax.model import HybridLM
from engram_jax.optim import TrainState, make_optimizer, make_steps
path = compile_cache.enable(sys.argv[1])
cfg = preset("smoke")
tcfg = TrainConfig(steps=3, batch_size=2)
model = HybridLM(cfg, rngs=nnx.Rngs(0))
g, p, r = nnx.split(model, nnx.Param, ...)
tx = make_optimizer(tcfg)
st = TrainState(p, tx.init(p), r, jnp.zeros((), jnp.int32))
step, _ = make_steps(g, cfg, tcfg, tx)
rng = np.random.default_rng(0)
tok = rng.integers(0, cfg.vocab_size, (2, cfg.seq_len + 1))
from engram_jax.model import default_hash_fn
hid = {k: jnp.asarray(v) for k, v in default_hash_fn(cfg)(tok[:, :-1]).items()}
batch = {"tokens": jnp.asarray(tok, jnp.int32), "hash_ids": hid}
losses = []
for _ in range(3):
    st, m = step(st, batch)
    losses.append(float(m["loss"]))
leaves = jax.tree.leaves(st.params)
print(json.dumps({"cache": str(path) if path else None, "losses": losses,
                  "checksum": float(sum(jnp.sum(jnp.abs(x)) for x in leaves))}))
"""


def _run(setting: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROGRAM, setting], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ,
                                                       "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_settings_resolve_to_a_directory_or_none(monkeypatch, tmp_path):
    monkeypatch.setenv("ENGRAM_JAX_COMPILE_CACHE", str(tmp_path / "env"))
    assert compile_cache.resolve(None) == tmp_path / "env"
    assert compile_cache.resolve("default") == tmp_path / "env"
    assert compile_cache.resolve("off") is None
    assert compile_cache.resolve(str(tmp_path / "x")) == tmp_path / "x"
    monkeypatch.delenv("ENGRAM_JAX_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == tmp_path / "xdg" / "engram-jax" / "xla"


def test_a_cached_program_computes_what_a_fresh_compilation_computes(tmp_path):
    cache = tmp_path / "xla"
    fresh = _run("off")
    assert fresh["cache"] is None
    first = _run(str(cache))  # compiles and writes the cache
    entries = sorted(p.name for p in cache.iterdir())
    assert any(n.startswith("jit_train_step") for n in entries), entries
    second = _run(str(cache))  # reads every program back
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing new was compiled
    assert first == second and first["cache"] == str(cache)
    assert first["losses"] == fresh["losses"] and first["checksum"] == fresh["checksum"]


def test_an_unusable_directory_is_refused_before_any_work(tmp_path, capsys):
    from engram_jax.train import main

    not_a_dir = tmp_path / "cache-file"
    not_a_dir.write_text("x")
    compile_cache.check("off")
    compile_cache.check("default")
    compile_cache.check(str(tmp_path / "new" / "dir"))  # created
    assert (tmp_path / "new" / "dir").is_dir()
    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--steps", "1", "--out", str(out),
                 "--compile-cache", str(not_a_dir)]) == 2
    err = capsys.readouterr().err
    assert "error: --compile-cache" in err and "not a directory" in err
    assert not out.exists() and not_a_dir.read_text() == "x"
