"""What a trial logs beside its losses (engram_jax/trainmetrics.py): MFU against the chip's rated
peak (engram_jax/peaks.py), device memory, the MoE layers' drop rates and the Engram gates, in
``metrics.jsonl``, the reports and the record; and the statistics a step collects leave the
model's own computation and state as they were."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax import trainmetrics
from engram_jax.config import TrainConfig, preset
from engram_jax.layers import stats
from engram_jax.layers.moe import drop_rate
from engram_jax.model import HybridLM, default_hash_fn
from engram_jax.optim import TrainState, make_optimizer, make_steps
from engram_jax.peaks import RATED_PEAKS, mfu, rated_peak


@pytest.mark.parametrize("kind,dtype,tflops", [
    ("NVIDIA H200", "bfloat16", 989.4),
    ("NVIDIA H200", "float32", 494.7),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),
    ("NVIDIA H100 PCIe", "bfloat16", 756.5),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
    ("NVIDIA A100-PCIE-40GB", "float16", 312.0),
    ("NVIDIA B200", "bfloat16", 2250.0),
    ("TPU v4", "bfloat16", 275.0),
    ("TPU v5 lite", "bfloat16", 197.0),
    ("TPU v5e", "bfloat16", 197.0),
    ("TPU v5", "bfloat16", 459.0),
    ("TPU v5p", "bfloat16", 459.0),
    ("TPU v6 lite", "bfloat16", 918.0),
    ("TPU v6e", "bfloat16", 918.0),
])
def test_rated_peaks(kind, dtype, tflops):
    p = rated_peak(kind, dtype)
    assert p is not None and p.flops == pytest.approx(tflops * 1e12)
    assert p.source and p.dtype == dtype


@pytest.mark.parametrize("kind,dtype", [("cpu", "float32"), ("NVIDIA H100 NVL", "bfloat16"),
                                        ("NVIDIA H200 NVL", "bfloat16"), ("NVIDIA L4", "bfloat16"),
                                        ("TPU v4", "float16")])
def test_no_rated_peak_where_the_table_has_none(kind, dtype):
    assert rated_peak(kind, dtype) is None
    assert mfu(1e6, 1e6, None) is None


def test_every_table_entry_names_its_source():
    for pattern, chip, peaks, source in RATED_PEAKS:
        assert bool(peaks) == bool(chip) == bool(source), pattern
        assert all(v > 0 for v in peaks.values())


def test_mfu_of_the_committed_h200_check_against_the_rated_peak():
    """The H200 check's train-step MFU, 0.25 / 0.26 against its measured 605 TFLOP/s matmul,
    is about 0.15 / 0.16 of the H200's rated 989.4."""
    peak = rated_peak("NVIDIA H200", "bfloat16")
    for measured in (0.25, 0.26):
        tps, fpt = measured * 605e12 / 1e9, 1e9
        assert mfu(tps, fpt, peak) == pytest.approx(measured * 605 / 989.4)


def _hybrid(**moe):
    cfg = dataclasses.replace(preset("tiny"), seq_len=16)
    return cfg.with_overrides({f"moe.{k}": v for k, v in moe.items()}) if moe else cfg


def _batch(cfg, B, seed=1):
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, cfg.seq_len + 1))
    hid = {k: jnp.asarray(v) for k, v in default_hash_fn(cfg)(ids[:, :-1]).items()}
    return {"tokens": jnp.asarray(ids, jnp.int32), "hash_ids": hid}


def test_gate_is_recorded_only_while_collecting():
    cfg = _hybrid()
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    b = _batch(cfg, 2)
    tok = b["tokens"][:, :-1]
    plain, _ = model(tok, b["hash_ids"])
    assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))  # nothing sown
    (collected, _), recorded = stats.collect(HybridLM.__call__, model, tok, b["hash_ids"])
    gates = recorded["gate_mean"]
    assert list(gates) == list(cfg.engram.layer_ids)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(collected))
    assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))  # nothing left behind
    # the recorded mean is the gate's: alpha of layer 1 from the residual entering it
    blk = model.blocks[1]
    h = jnp.take(model.embed[...], tok, axis=0)
    h, _, _ = model.blocks[0](h, None)
    eng = blk.engram
    e = eng.lookup(b["hash_ids"][1])
    k = e @ eng.w_k[...] + eng.b_k[...]
    s = jnp.sum(eng.norm_h(h) * eng.norm_k(k), -1) / jnp.sqrt(jnp.float32(cfg.d_model))
    s = jnp.sign(s) * jnp.sqrt(jnp.maximum(jnp.abs(s), 1e-6))
    np.testing.assert_allclose(float(gates[1]), float(jnp.mean(jax.nn.sigmoid(s))), rtol=1e-5)


@pytest.mark.parametrize("dispatch,cf", [("capacity", 0.5), ("dropless", 1.25)])
def test_train_and_eval_steps_return_drop_rates_and_gates(dispatch, cf):
    cfg = _hybrid(dispatch=dispatch, capacity_factor=cf)
    tcfg = TrainConfig(steps=10, batch_size=4)
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(tcfg)
    state = TrainState(params, tx.init(params), rest, jnp.zeros((), jnp.int32))
    train_step, eval_step = make_steps(graphdef, cfg, tcfg, tx, eval_stats=True)
    b = _batch(cfg, 4)
    ev = eval_step(state, b)
    _, aux = HybridLM(cfg, rngs=nnx.Rngs(0))(b["tokens"][:, :-1], b["hash_ids"])
    want = drop_rate(aux["load"], cfg.moe, 4 * cfg.seq_len)
    np.testing.assert_array_equal(np.asarray(ev["moe_drop_rate"]), np.asarray(want))
    assert ev["moe_drop_rate"].shape == (len(cfg.moe_layer_ids),)
    assert ev["engram_gate"].shape == (len(cfg.engram.layer_ids),)
    if dispatch == "dropless":
        assert float(jnp.max(ev["moe_drop_rate"])) == 0.0
    elif cf < 1:
        assert float(jnp.min(ev["moe_drop_rate"])) > 0.0
    _, plain_eval = make_steps(graphdef, cfg, tcfg, tx)
    assert plain_eval(state, b).shape == ()  # the default eval step returns the loss alone
    _, m = train_step(state, b)  # (donates the state)
    np.testing.assert_array_equal(np.asarray(m["moe_drop_rate"]), np.asarray(ev["moe_drop_rate"]))
    fields = trainmetrics.step_fields(jax.device_get(m), cfg, tokens_per_s=1000.0, peak=None)
    assert fields["moe_drop_rate"] == pytest.approx(float(np.mean(m["moe_drop_rate"])))
    assert set(fields) >= {"moe_drop_rate", "moe_drop_rate_l0", "moe_drop_rate_l1",
                           "engram_gate_mean", "engram_gate_l1"}
    assert "mfu" not in fields  # no rated peak given


def test_step_fields_mfu_and_record_fields():
    cfg = _hybrid()
    peak = rated_peak("NVIDIA H200", "bfloat16")
    m = {"moe_drop_rate": np.array([0.1, 0.3]), "engram_gate": np.array([0.6])}
    f = trainmetrics.step_fields(m, cfg, tokens_per_s=2e6, peak=peak, n_devices=2)
    assert f["mfu"] == pytest.approx(1e6 * cfg.flops_per_token() / 989.4e12)
    assert f["moe_drop_rate"] == pytest.approx(0.2) and f["moe_drop_rate_l1"] == pytest.approx(0.3)
    assert f["engram_gate_l1"] == pytest.approx(0.6)
    rows = [{"step": 0, "train_loss": None, "val_loss": 6.0},
            {"step": 5, "train_loss": 5.0, "moe_drop_rate": 0.2, "engram_gate_mean": 0.5,
             "device_peak_bytes_in_use": 10},
            {"step": 10, "train_loss": 4.0, "moe_drop_rate": 0.1, "engram_gate_mean": 0.4,
             "device_peak_bytes_in_use": 12}]
    r = trainmetrics.record_fields(rows, {"moe_drop_rate": np.array([0.0, 0.5])}, cfg,
                                   tokens_per_s=2e6, peak=peak, n_devices=2)
    assert r["moe_drop_rate"] == pytest.approx(0.15) and r["val_moe_drop_rate"] == 0.25
    assert r["engram_gate_mean"] == 0.4 and r["device_peak_bytes_in_use"] == 12
    assert r["mfu"] == pytest.approx(f["mfu"]) and r["peak_tflops_rated"] == pytest.approx(989.4)
    assert trainmetrics.record_fields([], {}, cfg, tokens_per_s=None, peak=None) == dict.fromkeys(
        trainmetrics.RECORD_KEYS)


def test_trial_logs_the_metrics(tmp_path):
    """A short trial's metrics.jsonl rows, reports and record carry the drop rates and gates
    (and on this CPU no MFU: it has no rated peak)."""
    from engram_jax.train import run_trial

    cfg = dataclasses.replace(preset("tiny"), seq_len=32)
    tcfg = TrainConfig(steps=4, batch_size=2, eval_every=2, log_every=2, eval_batches=1,
                       warmup_steps=1, prefetch=1)
    reports = []
    rec = run_trial(cfg, tcfg, corpus="pystdlib", out_dir=tmp_path / "t", report=reports.append,
                    progress=False)
    rows = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if r.get("train_loss") is not None]
    assert logged and all({"moe_drop_rate", "moe_drop_rate_l0", "moe_drop_rate_l1",
                           "engram_gate_mean", "max_load", "tokens_per_s"} <= set(r) for r in logged)
    assert all("val_moe_drop_rate" in r for r in logged if r.get("val_loss") is not None)
    assert all("moe_drop_rate" in r for r in reports)
    assert rec["moe_drop_rate"] == pytest.approx(np.mean([r["moe_drop_rate"] for r in logged]))
    assert 0.0 <= rec["val_moe_drop_rate"] <= 1.0 and 0.0 < rec["engram_gate_mean"] < 1.0
    assert rec["mfu"] is None and rec["peak_tflops_rated"] is None  # the CPU has no rated peak


def test_git_commit_is_dirty_for_code_changes_not_for_results(tmp_path):
    """A grid writing its rows into results/ of its checkout leaves the commit clean; an edit
    anywhere else marks it -dirty."""
    import subprocess

    from engram_jax.train import _git_commit

    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "results" / "g").mkdir(parents=True)
    (tmp_path / "results" / "g" / "runs.csv").write_text("a\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    sha = _git_commit(tmp_path)
    assert len(sha) == 40
    (tmp_path / "results" / "g" / "runs.csv").write_text("a\nb\n")
    assert _git_commit(tmp_path) == sha
    (tmp_path / "code.py").write_text("x = 2\n")
    assert _git_commit(tmp_path) == sha + "-dirty"


def test_host_cpu_names_the_model_and_cores(tmp_path):
    """Rows say which CPU made them: device_kind is only "cpu" there, and a rerun on another
    CPU model does not reproduce bit for bit."""
    import os
    import platform

    from engram_jax.train import host_cpu

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n"
                    "model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz\nflags\t: fpu\n"
                    "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz\n")
    assert host_cpu(info) == f"Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz x {os.cpu_count()}"
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # no model line (some arm64 hosts)
    fallback = platform.processor() or platform.machine() or "unknown"
    assert host_cpu(info) == f"{fallback} x {os.cpu_count()}"
    assert host_cpu(tmp_path / "absent").endswith(f" x {os.cpu_count()}")
