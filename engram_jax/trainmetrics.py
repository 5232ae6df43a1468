"""What a trial logs beside its losses: throughput, MFU against the chip's rated peak, device
memory, and the per-layer MoE drop rates and Engram gates its steps return.

Every logged row of ``metrics.jsonl`` (and so every Ray Tune report) gets, where they apply:

- ``tokens_per_s`` (already there) and ``mfu``: model FLOPs per second
  (``counting.flops_per_token``, the useful FLOPs) over the rated dense peak of the devices the
  trial ran on for its compute dtype (``peaks.rated_peak``; left out where the table has none,
  as on a CPU);
- ``device_bytes_in_use`` and ``device_peak_bytes_in_use``: JAX's memory statistics of the first
  device (left out where the backend keeps none, as the CPU);
- ``moe_drop_rate`` (mean over the MoE layers) and ``moe_drop_rate_l<layer>``: the share of
  (token, expert) assignments the capacity buffers dropped in the logged step (0 for dropless
  dispatch); ``max_load`` (already there): the most loaded expert over the mean load;
- ``engram_gate_mean`` and ``engram_gate_l<layer>``: the mean of the Engram gate alpha in the
  logged step;
- at an evaluation, ``val_moe_drop_rate`` (and per layer) and ``val_engram_gate_mean`` over the
  evaluation batches.

The record (one row of a grid's ``runs.csv``) carries the run's ``mfu``, the rated peak it was
taken against, the mean drop rate of the logged training steps and the final evaluation's, the
last logged gate mean and the device memory peak.
"""

from __future__ import annotations

import math

import numpy as np

from engram_jax.config import ModelConfig
from engram_jax.peaks import RatedPeak, mfu

# The per-layer statistics a step returns (``optim.STAT_KEYS``) and the name of their mean.
MEAN_NAMES = {"moe_drop_rate": "moe_drop_rate", "engram_gate": "engram_gate_mean"}


def _layers(cfg: ModelConfig, key: str) -> list[int]:
    if key == "moe_drop_rate":
        return list(cfg.moe_layer_ids)
    return sorted(cfg.engram.layer_ids) if cfg.engram is not None else []


def stat_fields(stats: dict, cfg: ModelConfig, prefix: str = "") -> dict:
    """Per-layer statistics ``{"moe_drop_rate": [n_moe], "engram_gate": [n_engram]}`` (arrays or
    lists) as flat fields: the mean and one field per layer."""
    out = {}
    for key, values in stats.items():
        if key not in MEAN_NAMES:
            continue
        v = np.asarray(values, np.float64).reshape(-1)
        if v.size == 0:
            continue
        out[prefix + MEAN_NAMES[key]] = float(np.mean(v))
        layers = _layers(cfg, key)
        if len(layers) == v.size:
            out.update({f"{prefix}{key}_l{lid}": float(x) for lid, x in zip(layers, v)})
    return out


def device_memory() -> dict:
    """Bytes in use and the peak of the first device (empty where JAX keeps no statistics)."""
    import jax

    try:
        s = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - a backend without the call
        return {}
    if not s:
        return {}
    out = {}
    if "bytes_in_use" in s:
        out["device_bytes_in_use"] = int(s["bytes_in_use"])
    if "peak_bytes_in_use" in s:
        out["device_peak_bytes_in_use"] = int(s["peak_bytes_in_use"])
    return out


def trial_peak(cfg: ModelConfig) -> tuple[RatedPeak | None, int]:
    """The rated peak of this process's first device for ``cfg.dtype``, and the device count."""
    import jax

    from engram_jax.peaks import rated_peak

    return rated_peak(jax.devices()[0].device_kind, cfg.dtype), jax.device_count()


def step_fields(metrics: dict, cfg: ModelConfig, *, tokens_per_s: float | None,
                peak: RatedPeak | None, n_devices: int = 1) -> dict:
    """The fields a logged training step adds to its row (see the module docstring)."""
    from engram_jax.counting import flops_per_token

    out = {}
    if peak is not None and tokens_per_s:
        out["mfu"] = mfu(tokens_per_s / n_devices, flops_per_token(cfg), peak)
    out.update(device_memory())
    out.update(stat_fields({k: metrics[k] for k in MEAN_NAMES if k in metrics}, cfg))
    return out


def mean_stats(outputs: list[dict]) -> dict:
    """The mean over evaluation batches of each statistic an eval step returned."""
    keys = [k for k in MEAN_NAMES if outputs and k in outputs[0]]
    return {k: np.mean([np.asarray(o[k], np.float64) for o in outputs], axis=0) for k in keys}


RECORD_KEYS = ("peak_tflops_rated", "peak_rated_chip", "peak_rated_dtype", "mfu", "moe_drop_rate",
               "val_moe_drop_rate", "engram_gate_mean", "device_peak_bytes_in_use")


def record_fields(rows: list[dict], final_stats: dict, cfg: ModelConfig, *,
                  tokens_per_s: float | None, peak: RatedPeak | None, n_devices: int = 1) -> dict:
    """The record's fields: MFU of the run against the rated peak, the mean training drop rate
    over the logged steps and the final evaluation's, the last gate mean, the memory peak."""
    from engram_jax.counting import flops_per_token

    # Every key on every record (None where it does not apply), so that a grid's runs.csv has
    # the same columns whichever of its trials finished first.
    out = dict.fromkeys(RECORD_KEYS)
    if peak is not None:
        out.update({"peak_tflops_rated": peak.flops / 1e12, "peak_rated_chip": peak.chip,
                    "peak_rated_dtype": peak.dtype})
        if tokens_per_s:
            out["mfu"] = mfu(tokens_per_s / n_devices, flops_per_token(cfg), peak)
    trains = [r for r in rows if r.get("train_loss") is not None]
    drops = [r["moe_drop_rate"] for r in trains if _finite(r.get("moe_drop_rate"))]
    if drops:
        out["moe_drop_rate"] = float(np.mean(drops))
    final = stat_fields(final_stats, cfg, prefix="val_")
    if "val_moe_drop_rate" in final:
        out["val_moe_drop_rate"] = final["val_moe_drop_rate"]
    gates = [r["engram_gate_mean"] for r in trains if _finite(r.get("engram_gate_mean"))]
    if gates:
        out["engram_gate_mean"] = gates[-1]
    peaks = [r["device_peak_bytes_in_use"] for r in rows if r.get("device_peak_bytes_in_use")]
    if peaks:
        out["device_peak_bytes_in_use"] = max(peaks)
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
