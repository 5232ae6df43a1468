"""The sparsity-allocation solver: (pure MoE base, rho) -> iso-parameter MoE + Engram hybrid.

Implements docs/paper.md section 2. The sparse budget P_sparse = P_tot - P_act of a pure MoE base
is split between routed experts (share rho) and Engram table rows (share 1 - rho). Lowering rho keeps
top-k, shared experts, attention and dense parts and removes whole routed experts,

    E(rho) = k + round_half_up(rho * (E0 - k)),

giving their weights and router columns, minus the Engram module's own dense parameters (value/key
projections, gate norms, conv: ``counting.engram_dense_params``), to prime-sized table rows. P_tot
then stays equal to the base up to the prime rounding of the tables, and P_act moves only by the
Engram dense parameters minus the removed router columns. Both are checked: ``total`` and ``active``
must stay within ``TOLERANCE`` (2%) of the base, else ``ValueError`` names the constraint.

Budgets (``BUDGETS``) are the named sweep ladders, from a CPU smoke test to GPU grids; see
``budget_ladder()`` (``python -m engram_jax.allocation``) for their parameters, FLOPs and expected
times. The CPU times come from throughput measured on the 2-core development machine; the GPU times
(``gpu-s``, ``gpu-m``, sized for one H100 and about 30 minutes per grid) are ESTIMATES from the
FLOP count at an assumed 30% MFU of the measured 664 TFLOP/s bf16 peak, not measurements.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

from engram_jax.config import EngramConfig, ModelConfig
from engram_jax.counting import engram_dense_params, expert_params
from engram_jax.hashing import head_primes

TOLERANCE = 0.02  # allowed relative change of total and active parameters vs the base
DEFAULT_RHOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
# The GPU ladder's corpus: a web corpus the user downloads (README "The GPU ladder"); the grid
# loader expands the variable and names it when it is unset.
WEB_CORPUS = "$ENGRAM_WEB_CORPUS"
# The ladder's rho grids: down to 0.3 where the allocation stays within the 2% tolerance;
# cpu-1e12's removed router columns (48 wide) shrink its active parameters by 2.3% at 0.3.
LADDER_RHOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
MIN_ROWS_PER_HEAD = 2  # the smallest prime: a head needs at least this many rows
_DENSE_SHARE = 0.015  # default_engram keeps Engram dense params <= 1.5% of the base's active


def n_routed_for(base: ModelConfig, rho: float) -> int:
    """E(rho) = k + round_half_up(rho * (E0 - k)): routed experts kept at share ``rho``.

    Rounding is half-up (not Python's banker's rounding), so e.g. E0 - k = 5 and rho = 0.5 keeps
    k + 3 experts. The realised rho (``param_counts()['rho']``) then differs from the nominal one
    by up to half an expert's share; grids whose E0 - k is a multiple of 10 realise the 0.1 steps
    exactly up to the router and Engram dense terms.
    """
    _check_rho(rho)
    _check_base(base)
    m = base.moe
    e = m.top_k + math.floor(rho * (m.n_routed - m.top_k) + 0.5)
    if e < m.top_k:  # unreachable for rho in [0, 1]; kept as the explicit constraint
        raise ValueError(f"E(rho={rho}) = {e} routed experts < top_k = {m.top_k}")
    return int(e)


def default_engram(base: ModelConfig) -> EngramConfig:
    """The Engram plan used when ``allocate`` gets none: placement, heads and head width.

    Placement follows the paper (docs/paper.md section 1.6 (Placement): layer 2, and layers 2 and 6
    of a 12-layer model, 0-indexed 1 and 5): layer 1 for models of up to 4 layers (layer 0 when
    there is only one), layers 1 and L // 2 - 1 for deeper ones. Orders 2..3 (the paper's N = 3),
    2 heads per order below d_model 256 and 4 from there. ``d_head`` is the largest power of two
    (<= 64, >= 4) that keeps the Engram dense parameters under 1.5% of the base's active
    parameters, since they add to P_act. ``table_sizes`` is a placeholder; ``allocate`` sets it.
    """
    _check_base(base)
    L, D = base.n_layers, base.d_model
    if L == 1:
        layer_ids: tuple[int, ...] = (0,)
    elif L <= 4:
        layer_ids = (1,)
    else:
        layer_ids = (1, max(2, L // 2 - 1))
    heads = 2 if D < 256 else 4
    active = base.param_counts()["active"]
    # Widest memory first at the preferred head count; tiny bases fall back to fewer/narrower heads.
    candidates = [(heads, d) for d in (64, 32, 16, 8)] + [(2, 4), (1, 8), (1, 4)]
    for heads, d_head in candidates:
        plan = EngramConfig(layer_ids=layer_ids, heads_per_ngram=heads, d_head=d_head, table_sizes=(2, 2))
        dense = len(layer_ids) * engram_dense_params(dataclasses.replace(base, engram=plan))
        if dense <= _DENSE_SHARE * active:
            break
    return EngramConfig(layer_ids=layer_ids, heads_per_ngram=heads, d_head=d_head, table_sizes=(2, 2))


@lru_cache(maxsize=4096)
def _realised_rows(size: int, max_ngram: int, heads: int, layer_ids: tuple[int, ...]) -> int:
    primes = head_primes((size,) * (max_ngram - 1), max_ngram, heads, layer_ids)
    return sum(p for per_layer in primes.values() for order in per_layer for p in order)


def _table_size_for(target_rows: int, e: EngramConfig) -> int:
    """The per-order base size whose realised (prime) rows come closest to ``target_rows``.

    Each head gets the next unused prime above the search start, so the realised rows exceed
    ``n_heads_total * size``; the realised count is non-decreasing in ``size``, so a bisection
    finds the largest size not above the target, and its successor is the other candidate.
    """
    n_sub = len(e.layer_ids) * e.n_heads
    args = (e.max_ngram, e.heads_per_ngram, tuple(e.layer_ids))
    lo, hi = MIN_ROWS_PER_HEAD, max(MIN_ROWS_PER_HEAD, target_rows // n_sub)
    if _realised_rows(lo, *args) > target_rows:
        return lo
    while lo < hi:  # largest size with realised rows <= target
        mid = (lo + hi + 1) // 2
        if _realised_rows(mid, *args) <= target_rows:
            lo = mid
        else:
            hi = mid - 1
    under = target_rows - _realised_rows(lo, *args)
    over = _realised_rows(lo + 1, *args) - target_rows
    return lo + 1 if over < under else lo


def allocate(base: ModelConfig, rho: float, engram: EngramConfig | None = None) -> ModelConfig:
    """An iso-parameter hybrid holding share ``rho`` of the base's sparse budget in routed experts.

    Args:
      base: a pure MoE config (``moe`` set, ``engram`` None): the rho = 1 point.
      rho: routed-expert share of P_sparse in [0, 1]. 1 returns ``base`` unchanged.
      engram: the Engram plan (layer_ids, max_ngram, heads_per_ngram, d_head, gate/conv switches,
        seed ...); its ``table_sizes`` are ignored and solved for. Default: ``default_engram(base)``.

    Returns:
      ``base`` with E(rho) routed experts (see ``n_routed_for``) and an Engram whose tables hold
      the freed parameters, split evenly over layers, orders and heads; the realised rho is
      ``param_counts()['rho']``.

    Raises:
      ValueError: rho outside [0, 1]; base without MoE or already with Engram; E(rho) < top_k; an
        Engram layer outside the model; a table budget below ``MIN_ROWS_PER_HEAD`` rows per head;
        ``total`` or ``active`` moving by more than ``TOLERANCE`` from the base. Each message
        names the constraint.
    """
    e_new = n_routed_for(base, rho)  # validates rho and base
    m = base.moe
    if e_new == m.n_routed:
        if rho == 1.0:
            return base
        raise ValueError(
            f"rho={rho} rounds to all E0={m.n_routed} routed experts (E0 - top_k = "
            f"{m.n_routed - m.top_k}): nothing moves into Engram tables; use rho <= "
            f"{1 - 0.5 / (m.n_routed - m.top_k):.3g} or rho = 1"
        )
    plan = engram if engram is not None else default_engram(base)
    bad = [i for i in plan.layer_ids if not 0 <= i < base.n_layers]
    if bad:
        raise ValueError(f"engram.layer_ids {bad} outside [0, n_layers={base.n_layers})")
    n_moe = len(base.moe_layer_ids)
    freed = n_moe * (m.n_routed - e_new) * (expert_params(base) + base.d_model)
    probe = dataclasses.replace(base, engram=dataclasses.replace(plan, table_sizes=(2,) * (plan.max_ngram - 1)))
    dense = len(plan.layer_ids) * engram_dense_params(probe)
    target_rows = (freed - dense) // plan.d_head
    n_sub = len(plan.layer_ids) * plan.n_heads
    if target_rows < MIN_ROWS_PER_HEAD * n_sub:
        raise ValueError(
            f"table sizes too small: rho={rho} frees {freed:,} parameters, Engram dense params take "
            f"{dense:,}, leaving {max(target_rows, 0):,} rows for {n_sub} sub-tables (need >= "
            f"{MIN_ROWS_PER_HEAD} rows per head); lower rho, engram.d_head or heads, or use fewer "
            "Engram layers"
        )
    size = _table_size_for(target_rows, plan)
    cfg = dataclasses.replace(
        base,
        moe=dataclasses.replace(m, n_routed=e_new),
        engram=dataclasses.replace(plan, table_sizes=(size,) * (plan.max_ngram - 1)),
    )
    b, c = base.param_counts(), cfg.param_counts()
    for key, what in (("total", "total parameters"), ("active", "active parameters")):
        change = c[key] / b[key] - 1.0
        if abs(change) > TOLERANCE:
            if key == "total":
                hint = "table rows cannot absorb the freed experts at this granularity"
            elif change > 0:
                hint = "Engram projections too large for this base; lower engram.d_head or heads"
            else:
                hint = ("the removed experts' router columns are too large a share of the active "
                        "parameters; use a higher rho or a base with wider experts")
            raise ValueError(
                f"{what} {'grow' if change > 0 else 'shrink'} by {abs(change):.1%} "
                f"(> {TOLERANCE:.0%}) at rho={rho}: {hint}"
            )
    return cfg


def _check_rho(rho: float) -> None:
    if not (isinstance(rho, (int, float)) and 0.0 <= rho <= 1.0):  # also rejects NaN
        raise ValueError(f"rho must be in [0, 1], got {rho!r}")


def _check_base(base: ModelConfig) -> None:
    if base.moe is None:
        raise ValueError("allocate needs a base with MoE (moe set): a dense model has no experts to trade")
    if base.engram is not None:
        raise ValueError(
            "allocate needs a pure MoE base (engram None): this base already has Engram tables; "
            "pass its Engram plan as `engram=` instead"
        )


# ---------------------------------------------------------------------------------------------
# budgets: named sweep ladders


@dataclass(frozen=True, kw_only=True, slots=True)
class Budget:
    """One rung of the budget ladder: a pure-MoE base preset and how to train its rho grid.

    Attributes:
      name: the budget's name (also the name of its base preset in ``config.PRESETS``).
      preset: base preset (pure MoE, the rho = 1 point).
      engram: Engram plan for ``allocate`` (None: ``default_engram(base)``).
      rhos: the rho grid; seeds: default seeds (one trial per rho and seed).
      steps, batch_size, lr, warmup_steps: training settings of every trial.
      train: further TrainConfig overrides as (key, value) pairs.
      corpus: "pystdlib" | "pysrc" | a path.
      device: "cpu" or "gpu" (what the budget is sized for).
      corpus_tokens: rough size of the training split in tokens at this vocabulary, used only
        for the ladder's epochs column (the record's ``epochs`` is the measured value).
      cpu_tokens_per_s: CPU budgets: one trial's training throughput measured on the 2-core
        development machine (for the ladder's time estimate).
      description: one line for the ladder.
    """

    name: str
    preset: str
    engram: EngramConfig | None = None
    rhos: tuple[float, ...] = DEFAULT_RHOS
    seeds: tuple[int, ...] = (0,)
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    train: tuple[tuple[str, object], ...] = ()
    corpus: str = "pystdlib"
    device: str = "cpu"
    corpus_tokens: float
    cpu_tokens_per_s: float | None = None
    description: str

    def base(self) -> ModelConfig:
        from engram_jax.config import preset

        return preset(self.preset)

    def train_overrides(self) -> dict:
        """TrainConfig fields of every trial (seed excluded)."""
        return {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
                "warmup_steps": self.warmup_steps, **dict(self.train)}

    def tokens(self) -> int:
        """Tokens one trial trains on."""
        return self.steps * self.batch_size * self.base().seq_len


BUDGETS: dict[str, Budget] = {
    b.name: b
    for b in (
        Budget(
            name="smoke", preset="smoke", steps=60, batch_size=16, lr=3e-3, warmup_steps=10,
            train=(("eval_every", 30), ("eval_batches", 2), ("log_every", 10)),
            corpus="pystdlib", device="cpu", corpus_tokens=5.5e6, cpu_tokens_per_s=15e3,
            description="machinery check: the whole grid in a few minutes on a 2-core CPU",
        ),
        Budget(
            name="cpu-small", preset="cpu-small", steps=480, batch_size=16, lr=3e-3,
            warmup_steps=40, train=(("eval_every", 120), ("eval_batches", 8), ("log_every", 20)),
            # 10k tokens/s: measured per trial with two side by side (results/bench/README.md, the
            # grid part of run 20261128T160726).
            corpus="pystdlib", device="cpu", corpus_tokens=3.8e6, cpu_tokens_per_s=10e3,
            description="a real (small) allocation curve on a 2-core CPU in about 20 minutes",
        ),
        # The paper-regime ladder: D = 40 P_act training tokens (the paper: ~100), P_tot/P_act
        # ~9.7, E0 - k = 40, 3 seeds, pysrc at vocabulary 512 (130M training tokens: each trial
        # sees under 0.07 of it). Learning rates: the best of the lr-<budget> grids at rho = 1
        # (results/lr-<budget>; cpu-1e12: 3.2e-2 of 2e-3 .. 6.4e-2, also the best at rho = 0.7;
        # cpu-3e12: 1.6e-2 of 8e-3 .. 6.4e-2; cpu-1e13: 1.6e-2 of 4e-3 .. 3.2e-2). Tokens/s: measured
        # per trial with two trials side by side, at rho 0.8 (results/bench/README.md, the grid part
        # of run 20261128T160726; the committed grids ran at about a quarter to a half of this).
        *(
            Budget(
                name=name, preset=name, rhos=LADDER_RHOS if name != "cpu-1e12" else DEFAULT_RHOS,
                seeds=(0, 1, 2), steps=steps,
                batch_size=32, lr=lr, warmup_steps=warmup,
                train=(("eval_every", steps // 4 + 1), ("eval_batches", 4), ("log_every", 10),
                       ("final_eval_tokens", 1 << 20)),
                corpus="pysrc", device="cpu", corpus_tokens=1.3e8, cpu_tokens_per_s=tps,
                description=desc,
            )
            for name, steps, warmup, lr, tps, desc in (
                ("cpu-1e12", 627, 30, 3.2e-2, 60e3, "C = 1.0e12: 64k active, 2.6M tokens"),
                ("cpu-3e12", 1096, 55, 1.6e-2, 52e3, "C = 3.0e12: 112k active, 4.5M tokens"),
                ("cpu-1e13", 2068, 100, 1.6e-2, 31e3, "C = 1.1e13: 212k active, 8.5M tokens"),
            )
        ),
        # The paper-shaped candidate (docs: README "Does the suite reproduce the paper's U?"):
        # vocabulary 2048, 4 layers, D = 100 P_act (the paper's ratio: 9.58M tokens, 2,338 steps
        # of 32 x 128), and the paper's Engram shape: orders 2-3, 8 hash heads per order, memory
        # width d_mem = d_model / 2 (16 heads of width 1), at layer 1. rho stops at 0.4: below it
        # the removed router columns shrink the active parameters by more than 2%. On
        # pywheels-v1, the reproducible corpus. Tokens/s: cpu-3e12's measured 52k scaled by the
        # FLOPs per token (an estimate until its grids record it).
        Budget(
            name="cpu2k-5e12", preset="cpu2k-5e12", seeds=(0, 1, 2), steps=2338, batch_size=32,
            lr=1.6e-2, warmup_steps=115,
            engram=EngramConfig(layer_ids=(1,), max_ngram=3, heads_per_ngram=8, d_head=1,
                                table_sizes=(2, 2)),
            train=(("eval_every", 2338 // 4 + 1), ("eval_batches", 4), ("log_every", 10),
                   ("final_eval_tokens", 1 << 20)),
            corpus="pywheels-v1", device="cpu", corpus_tokens=4.77e7, cpu_tokens_per_s=47e3,
            description="C = 5.5e12: 96k active, 9.6M tokens, vocabulary 2048, 4 layers",
        ),
        # The paper-shaped ladder in cpu2k-5e12's regime (README "Does the suite reproduce the
        # paper's U?"): vocabulary 2048, d_model 32, 3 / 4 / 5 layers with 32 routed experts
        # 48 / 64 / 112 wide (top-2, one shared; P_tot/P_act 8.3-9.6), D = 100 P_act (batches of
        # 32 x 128), the paper's Engram shape (orders 2-3, 8 heads of width 1 per order: d_mem =
        # 16 = d_model / 2) at layer 1, rho 1.0 .. 0.3 x three seeds, on pywheels-v1; C from
        # 1.95e12 to 2.1e13 (1.03 decades). Learning rates: the best of lr-<budget> (rho 1.0) and
        # lr-<budget>-rho0.3. Tokens/s: cpu2k-5e12's measured 25k (two trials side by side)
        # scaled by the FLOPs per token, an estimate until their grids record it.
        *(
            Budget(
                name=name, preset=name, rhos=LADDER_RHOS, seeds=(0, 1, 2), steps=steps,
                batch_size=32, lr=lr, warmup_steps=steps // 20,
                engram=EngramConfig(layer_ids=(1,), max_ngram=3, heads_per_ngram=8, d_head=1,
                                    table_sizes=(2, 2)),
                train=(("eval_every", steps // 4 + 1), ("eval_batches", 4), ("log_every", 10),
                       ("final_eval_tokens", 1 << 20)),
                corpus="pywheels-v1", device="cpu", corpus_tokens=4.77e7, cpu_tokens_per_s=tps,
                description=desc,
            )
            for name, steps, lr, tps, desc in (
                ("ladder2k-2e12", 1393, 1.6e-2, 33e3,
                 "C = 1.95e12: 57k active, 5.7M tokens, vocabulary 2048, 3 layers"),
                ("ladder2k-5e12", 2307, 1.6e-2, 25e3,
                 "C = 5.4e12: 94k active, 9.4M tokens, vocabulary 2048, 4 layers"),
                ("ladder2k-2e13", 4571, 1.6e-2, 16e3,
                 "C = 2.1e13: 187k active, 18.7M tokens, vocabulary 2048, 5 layers"),
            )
        ),
        # The paper-regime GPU ladder: D = 100 P_act (the paper's ratio), P_tot/P_act ~ 10 with
        # the paper's fine-grained experts (106 routed, top-6, two shared), the paper's Engram
        # shape (orders 2-3, 8 heads per order, d_mem = d_model / 2, at layers 1 and L // 2 - 1),
        # vocabulary 32768, on a web corpus (FineWeb-Edu's sample-10BT Parquet files, pointed at
        # by $ENGRAM_WEB_CORPUS; README "The GPU ladder"). Batches of 256-512 sequences of 1024
        # tokens, split into micro-batches (grad_accum) and a chunked loss so that a trial's
        # memory plan fits an 80 GB GPU at the sweep's memory fraction 0.9. Learning rates:
        # placeholders until each budget's lr-<budget> grids (rho = 1.0 and 0.4) have run.
        *(
            Budget(
                name=name, preset=name, rhos=LADDER_RHOS, seeds=(0, 1, 2), steps=steps,
                batch_size=batch, lr=lr, warmup_steps=steps // 50,
                engram=EngramConfig(layer_ids=layers, max_ngram=3, heads_per_ngram=8,
                                    d_head=d_head, table_sizes=(2, 2)),
                train=(("eval_every", steps // 8 + 1), ("eval_batches", 16), ("log_every", 50),
                       ("final_eval_tokens", 1 << 23), ("grad_accum", accum),
                       ("loss_chunk", 8192), ("ckpt_every", 1000)),
                corpus=WEB_CORPUS, device="gpu", corpus_tokens=9e9, description=desc,
            )
            for name, steps, batch, accum, lr, layers, d_head, desc in (
                ("gpu-1e17", 4927, 256, 4, 2e-3, (1, 5), 8,
                 "C = 1.0e17: 12.9M active, 1.29B tokens, 12 layers x 256"),
                ("gpu-3e17", 5956, 384, 8, 1.5e-3, (1, 6), 10,
                 "C = 3.3e17: 23.4M active, 2.34B tokens, 14 layers x 320"),
                ("gpu-1e18", 8106, 512, 16, 1e-3, (1, 4), 16,
                 "C = 1.1e18: 42.5M active, 4.25B tokens, 10 layers x 512"),
            )
        ),
        # Quick GPU checks (a few minutes each): the machinery on one GPU, far from the paper's
        # regime (1.9 and 0.39 tokens per active parameter); not for deciding the law.
        Budget(
            name="gpu-s", preset="gpu-s", seeds=(0, 1), steps=1600, batch_size=64, lr=2e-3,
            warmup_steps=100, train=(("eval_every", 300), ("eval_batches", 16), ("log_every", 50)),
            corpus="pysrc", device="gpu", corpus_tokens=6e7,
            description="quick GPU check: 287M total / 27M active, two seeds",
        ),
        Budget(
            name="gpu-m", preset="gpu-m", steps=1200, batch_size=32, lr=1.5e-3,
            warmup_steps=100, train=(("eval_every", 300), ("eval_batches", 16), ("log_every", 50)),
            corpus="pysrc", device="gpu", corpus_tokens=5e7,
            description="quick GPU check: 974M total / 100M active, one seed",
        ),
    )
}


# Planning figures for budget_ladder(). GPU: the H200 measurements of results/bench/nvidia-h200.csv
# (run 20261128T042230): JAX's bf16 matmul peak there, 605.2 TFLOP/s, and the train step's MFU
# against it, 0.248-0.253 at gpu-s and 0.257-0.262 at gpu-m (d_model 512 and 768, rho 0.8 and
# 1.0); the planned time assumes the lowest at every budget (the narrower gpu-1e17 and gpu-3e17
# may run at less). CPU: a trial's
# throughput measured on the 2-core development machine (Budget.cpu_tokens_per_s).
H200_PEAK_FLOPS = 605.2e12
H200_MFU = 0.248
TRIAL_OVERHEAD_S = {"cpu": 25.0, "gpu": 60.0}  # start-up, data loading, compilation, evals


def expected_trial_s(b: Budget) -> float:
    """Planning estimate of one trial's wall time in seconds (see the constants above)."""
    cfg = allocate(b.base(), min(b.rhos), b.engram)
    if b.device == "gpu":
        # Executed FLOPs (capacity buffers included) of the rho with the largest Engram.
        train_s = b.tokens() * cfg.flops_per_token(executed=True) / (H200_PEAK_FLOPS * H200_MFU)
    else:
        train_s = b.tokens() / b.cpu_tokens_per_s
    return train_s + TRIAL_OVERHEAD_S[b.device]


def budget_ladder(budgets: dict[str, Budget] | None = None) -> str:
    """A Markdown table of the budgets: parameters, FLOPs/token, tokens, epochs, expected time.

    Times are planning estimates: CPU ones from throughput measured on the 2-core development
    machine, GPU ones from FLOPs at an assumed 30% MFU of the H100's 664 TFLOP/s (not measured).
    Epochs use each budget's rough ``corpus_tokens``; the records hold the measured value.
    """
    rows = [
        "| budget | device | total | P_tot | active | FLOPs/token | tokens/trial | epochs~ "
        "| trials | est. trial | est. grid (1 at a time) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in (budgets or BUDGETS).values():
        c = b.base().param_counts()
        n = len(b.rhos) * len(b.seeds)
        t = expected_trial_s(b)
        rows.append(
            f"| {b.name} | {b.device} | {_si(c['total'])} | {_si(c['p_tot'])} | {_si(c['active'])} "
            f"| {_si(b.base().flops_per_token())} | {_si(b.tokens())} "
            f"| {b.tokens() / b.corpus_tokens:.2g} | {n} | {t / 60:.1f} min | {n * t / 60:.0f} min |"
        )
    return "\n".join(rows)


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


if __name__ == "__main__":
    print(budget_ladder())
