"""Fake result grids in the sweep runner's exact layout, for tests and demos.

``results/<grid>/runs.csv`` (one row per trial, the runner's columns), ``curves/<trial_id>.csv``
and ``README.md``. The losses follow the paper's shapes with known parameters (a parabola in rho
with its optimum at ``rho_star``; a power law in Engram slots), plus Gaussian seed noise, so the
fitters can be checked against the truth. Never write these under the real results/ directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

RUN_COLUMNS = [
    "grid", "trial_id", "status", "error", "rho", "rho_actual", "seed", "budget", "preset",
    "corpus", "corpus_fingerprint", "config_json", "config_hash", "params_total", "params_p_tot",
    "params_active", "params_sparse", "params_embedding", "params_routed_experts",
    "params_engram_tables", "params_engram_dense", "n_routed", "top_k", "engram_slots",
    "engram_layers", "flops_per_token", "flops_per_token_6n", "steps", "batch_size", "seq_len",
    "tokens_seen", "train_tokens", "epochs", "train_loss", "val_loss", "best_val_loss",
    "tokens_per_s", "wall_s", "device_kind", "git_commit", "jax_version", "flax_version",
    "ray_version", "sweep_key", "sweep_value",
]

# Per budget: (P_act, tokens, base loss). Bigger budgets reach lower loss, as in the paper.
BUDGETS = {"small": (2.0e6, 4.0e7, 1.95), "medium": (6.0e6, 1.2e8, 1.80),
           "large": (1.8e7, 3.6e8, 1.68)}


def _curve(rng, final: float, tokens: float, steps: int = 200, every: int = 20) -> pd.DataFrame:
    step = np.arange(1, steps + 1)
    tok = step * tokens / steps
    # A fast early drop, then a slow power-law tail that reaches `final` at the last step.
    clean = final + 4.0 * np.exp(-step / 8) + 0.5 * ((step / steps) ** -0.3 - 1)
    train = clean + rng.normal(0, 0.01, steps)
    val = np.where((step % every == 0) | (step == steps), clean + 0.01, np.nan)
    val[-1] = final
    lr = 1e-3 * np.minimum(1.0, step / 20) * (1 - 0.9 * step / steps)
    return pd.DataFrame({"step": step, "tokens": tok, "train_loss": train, "val_loss": val,
                         "lr": lr})


def _row(grid, trial_id, rho, seed, budget, p_act, tokens, slots, loss, key, value, rng):
    p_sparse = 9 * p_act  # P_tot / P_act ~ 10 as in the paper's budgets
    engram = 0 if slots == 0 else slots * 64
    return {
        "grid": grid, "trial_id": trial_id, "status": "ok", "error": "", "rho": rho,
        "rho_actual": rho, "seed": seed, "budget": budget, "preset": f"moe_{budget}",
        "corpus": "pystdlib", "corpus_fingerprint": "fake0000", "config_json": json.dumps(
            {"rho": rho, "seed": seed}), "config_hash": f"h{abs(hash((rho, seed, slots))) % 10**8}",
        "params_total": p_act + p_sparse + 1e6, "params_p_tot": p_act + p_sparse,
        "params_active": p_act, "params_sparse": p_sparse, "params_embedding": 1e6,
        "params_routed_experts": rho * p_sparse, "params_engram_tables": engram,
        "params_engram_dense": 0.01 * p_act, "n_routed": int(round(2 + rho * 30)), "top_k": 2,
        "engram_slots": slots, "engram_layers": "[1]", "flops_per_token": 6.2 * p_act,
        "flops_per_token_6n": 6 * p_act, "steps": 200, "batch_size": 16, "seq_len": 128,
        "tokens_seen": tokens, "train_tokens": 4 * tokens, "epochs": 0.25,
        "train_loss": loss + 0.02, "val_loss": loss, "best_val_loss": loss - 0.001,
        "tokens_per_s": 3e4 * rng.uniform(0.9, 1.1), "wall_s": tokens / 3e4,
        "device_kind": "cpu", "git_commit": "0000000", "jax_version": "0.10.0",
        "flax_version": "0.12.0", "ray_version": "2.50.0", "sweep_key": key, "sweep_value": value,
    }


def _write(root: Path, grid: str, rows: list[dict], curves: dict[str, pd.DataFrame]) -> Path:
    gdir = Path(root) / grid
    (gdir / "curves").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=RUN_COLUMNS).to_csv(gdir / "runs.csv", index=False)
    for tid, c in curves.items():
        c.to_csv(gdir / "curves" / f"{tid}.csv", index=False)
    (gdir / "README.md").write_text(
        f"# {grid} (synthetic)\n\ncommand: analysis.synthetic\ncommit: 0000000\ndevice: cpu\n")
    return gdir


def write_rho_grid(
    root: str | Path, grid: str = "fake_rho", *, budgets=("small",), rhos=None, seeds: int = 3,
    rho_star: float = 0.78, curvature: float = 0.3, noise: float = 0.002, seed: int = 0,
    curves: bool = True, shape: str = "parabola",
) -> Path:
    """Writes a sparsity-allocation grid: loss = L_b + curvature (rho - rho_star)^2 + noise.

    Args:
        root: directory to create ``<grid>/`` in (e.g. pytest's tmp_path).
        grid: grid name. budgets: names from :data:`BUDGETS`. rhos: defaults to 0.4..1.0 by 0.1.
        seeds: runs per (budget, rho). rho_star, curvature, noise: the true curve.
        seed: generator seed. curves: also write per-trial curves.
        shape: "parabola", "monotone" (loss falls towards rho=1) or "flat".

    Returns:
        The grid directory.
    """
    rng = np.random.default_rng(seed)
    rhos = np.round(np.arange(0.4, 1.001, 0.1), 2) if rhos is None else np.asarray(rhos)
    rows, cdict = [], {}
    for budget in budgets:
        p_act, tokens, base = BUDGETS[budget]
        for rho in rhos:
            for s in range(seeds):
                truth = {"parabola": base + curvature * (rho - rho_star) ** 2,
                         "monotone": base + 0.05 * (1 - rho), "flat": base}[shape]
                loss = float(truth + rng.normal(0, noise))
                tid = f"{budget}_rho{rho:.2f}_s{s}"
                slots = int(round((1 - rho) * 9 * p_act / 64))
                rows.append(_row(grid, tid, float(rho), s, budget, p_act, tokens, slots, loss,
                                 "rho", f"{rho:g}", rng))
                if curves:
                    cdict[tid] = _curve(rng, loss, tokens)
    return _write(Path(root), grid, rows, cdict)


def write_memory_grid(
    root: str | Path, grid: str = "fake_memory", *, slots=None, seeds: int = 2, E: float = 1.70,
    A: float = 4.0, alpha: float = 0.3, noise: float = 0.001, seed: int = 0, curves: bool = True,
) -> Path:
    """Writes a memory-scaling grid: loss = E + A slots^-alpha (+ a slots=0 MoE baseline).

    Args:
        root: directory to create ``<grid>/`` in. grid: grid name.
        slots: Engram table rows per trial (defaults to 1e4..1e6, 5 sizes); 0 adds a baseline.
        seeds: runs per size. E, A, alpha: the true law. noise: seed noise on the loss.
        seed: generator seed. curves: also write per-trial curves.

    Returns:
        The grid directory.
    """
    rng = np.random.default_rng(seed)
    slots = [0, *np.logspace(4, 6, 5).astype(int)] if slots is None else list(slots)
    p_act, tokens, _ = BUDGETS["small"]
    rows, cdict = [], {}
    for n in slots:
        for s in range(seeds):
            truth = E + A * n ** -alpha if n > 0 else E + A * 3000 ** -alpha
            loss = float(truth + rng.normal(0, noise))
            tid = f"slots{n}_s{s}"
            rows.append(_row(grid, tid, 1.0, s, "small", p_act, tokens, int(n), loss,
                             "engram.table_sizes", json.dumps([int(n)]), rng))
            if curves:
                cdict[tid] = _curve(rng, loss, tokens)
    return _write(Path(root), grid, rows, cdict)


# ---------------------------------------------------------------- allocation-curve families
# Each family draws a true curve loss(rho) and its optimum (None when there is no interior one).
# The shapes differ on purpose from the fitter's candidate forms (exponential asymmetry, cubic
# and quartic terms, plateaus), so a calibration is not a fit of the model to itself.
RHO_GRID = np.round(np.arange(0.3, 1.001, 0.1), 2)


def _skewed(rng, lo, hi, steep_right):
    """L0 + A u^2 e^{s u}, u = rho - rho*: 2-6x steeper on one side at |u| = 0.2.

    A is set by the rise at the flat side's edge of the grid (0.015-0.05 nats; the paper's flat
    side rises 0.014 over 0.4 in rho), so every draw is a clear U; s <= 4.4 keeps it unimodal
    over the grid.
    """
    x0 = rng.uniform(lo, hi)
    s = rng.uniform(2.0, 4.4) * (1 if steep_right else -1)
    d = (x0 - RHO_GRID[0]) if steep_right else (RHO_GRID[-1] - x0)  # flat side's extent
    amp = rng.uniform(0.015, 0.05) / (d * d * np.exp(-abs(s) * d))
    return (lambda r: 1.8 + amp * (r - x0) ** 2 * np.exp(s * (r - x0))), x0


def _symmetric(rng):
    """A (cosh(c u) - 1): a parabola for small c, flatter-bottomed and steeper-walled for large."""
    x0, c = rng.uniform(0.5, 0.8), rng.uniform(1.0, 10.0)
    d = min(x0 - RHO_GRID[0], RHO_GRID[-1] - x0)
    amp = rng.uniform(0.012, 0.04) / (np.cosh(c * d) - 1)  # rise at the nearer edge
    return (lambda r: 1.8 + amp * (np.cosh(c * (r - x0)) - 1)), x0


def _edge(rng, right):
    """Optimum 0.02-0.08 from an edge of RHO_GRID; power rise (exponent 1.5-3) on each side."""
    gap = rng.uniform(0.02, 0.08)
    x0 = RHO_GRID[-1] - gap if right else RHO_GRID[0] + gap
    near, far = rng.uniform(0.02, 0.15), rng.uniform(0.02, 0.08)  # rises at the two edges
    pn, pf = rng.uniform(1.5, 3.0), rng.uniform(1.5, 3.0)
    dn, df = gap, (x0 - RHO_GRID[0]) if right else (RHO_GRID[-1] - x0)
    sgn = 1 if right else -1

    def f(r):
        u = sgn * (np.asarray(r, float) - x0)  # > 0 towards the near edge
        return 1.8 + np.where(u > 0, near * (np.abs(u) / dn) ** pn, far * (np.abs(u) / df) ** pf)
    return f, x0


def _monotone(rng):
    """Linear, convex or concave, towards either end; 0.01-0.2 nats over the grid."""
    drop, kind, up = rng.uniform(0.01, 0.2), rng.integers(3), rng.random() < 0.5
    g = [lambda t: t, lambda t: t**2.5, lambda t: 1 - (1 - t) ** 2.5][kind]
    span = RHO_GRID[-1] - RHO_GRID[0]

    def f(r):
        t = (np.asarray(r, float) - RHO_GRID[0]) / span
        return 1.8 + drop * g(t if up else 1 - t)
    return f, None


def _plateau(rng):
    """Steep on one side, exactly flat over the last 2-5 grid points at the other end."""
    k = int(rng.integers(2, 6))
    right = rng.random() < 0.5
    edge = RHO_GRID[-k] if right else RHO_GRID[k - 1]
    amp = rng.uniform(0.5, 3.0)

    def f(r):
        u = (edge - np.asarray(r, float)) if right else (np.asarray(r, float) - edge)
        return 1.8 + amp * np.clip(u, 0, None) ** 2
    return f, None


FAMILIES = {
    "symmetric": _symmetric,
    "asym-steep-right": lambda rng: _skewed(rng, 0.55, 0.85, True),
    "asym-steep-left": lambda rng: _skewed(rng, 0.45, 0.75, False),
    "edge-right": lambda rng: _edge(rng, True),
    "edge-left": lambda rng: _edge(rng, False),
    "flat": lambda rng: ((lambda r: np.full(np.shape(r), 1.8)), None),
    "monotone": _monotone,
    "plateau": _plateau,
}


def sample_allocation_runs(
    family: str, rng: np.random.Generator, *, noise: float, seeds: int = 3, rhos=None,
    seed_sd: float = 0.0,
) -> tuple[pd.DataFrame, float | None]:
    """Draws one synthetic allocation grid from a family of :data:`FAMILIES`.

    Args:
        family: family name. rng: the generator (drives the curve and the noise).
        noise: sd of the run-to-run noise on the loss. seeds: runs per rho.
        rhos: the rho grid (default :data:`RHO_GRID`, 0.3..1.0).
        seed_sd: sd of a per-seed offset shared by every rho (0: independent runs).

    Returns:
        (runs with columns rho, seed, val_loss; the true optimum, or None without one).
    """
    rhos = RHO_GRID if rhos is None else np.asarray(rhos, float)
    f, x0 = FAMILIES[family](rng)
    x = np.repeat(rhos, seeds)
    s = np.tile(np.arange(seeds), len(rhos))
    offs = rng.normal(0, seed_sd, seeds) if seed_sd > 0 else np.zeros(seeds)
    y = f(x) + offs[s] + rng.normal(0, noise, x.size)
    return pd.DataFrame({"rho": x, "seed": s, "val_loss": y}), x0
