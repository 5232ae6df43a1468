"""Frozen model and training configs, and named presets.

One ``ModelConfig`` per model, with nested ``MoEConfig`` (DeepSeekMoE: shared + fine-grained routed
experts) and ``EngramConfig`` (docs/paper.md section 1). Change configs with
``dataclasses.replace`` or ``with_overrides``; counts come from ``counting.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from engram_jax.parallel.mesh import MeshShape


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEConfig:
    """DeepSeekMoE layer: ``n_shared`` always-on experts + top-``top_k`` of ``n_routed``.

    Attributes:
      n_routed: E, routed experts per MoE layer.
      top_k: K, routed experts each token uses.
      n_shared: shared experts (always active), same hidden size as routed ones.
      d_expert: hidden width of one expert's SwiGLU.
      capacity_factor: expert buffer slots = ceil(capacity_factor * tokens * K / E); overflow drops.
      router: "sigmoid" (DeepSeek-V3: sigmoid affinities, top-k gates renormalised) or "softmax".
      balance: "bias" (auxiliary-loss-free: a routing bias nudged toward balance outside the
        gradient), "aux" (a switch-style auxiliary loss), or "none".
      bias_rate: step size of the routing-bias update (balance="bias").
      aux_coef: weight of the auxiliary balance loss (balance="aux").
      dispatch: "capacity" (buffers of ``capacity_factor`` slots per expert, overflow dropped;
        what every committed grid ran) or "dropless" (assignments sorted by expert, grouped
        matmuls over exactly the routed rows, unsorted back; nothing is dropped).
      grouped_matmul: the dropless path's grouped matmul: "tiles" (each expert's rows padded to a
        multiple of ``dropless_tile``, one batched matmul over the tiles with the tile's expert
        weights, its weight gradient a batched matmul summed per expert; static shapes, any
        backend) or "ragged" (``jax.lax.ragged_dot`` and its own gradient; the CPU lowers it
        to a dense matmul per expert, for tests).
      dropless_tile: rows per tile of ``grouped_matmul="tiles"``.
    """

    n_routed: int
    top_k: int
    n_shared: int = 1
    d_expert: int
    capacity_factor: float = 1.25
    router: str = "sigmoid"
    balance: str = "bias"
    bias_rate: float = 1e-3
    aux_coef: float = 1e-2
    dispatch: str = "capacity"
    grouped_matmul: str = "tiles"
    dropless_tile: int = 64

    def __post_init__(self):
        if self.n_routed < 1:
            raise ValueError(f"moe.n_routed must be >= 1, got {self.n_routed}")
        if not 1 <= self.top_k <= self.n_routed:
            raise ValueError(f"moe.top_k must be in [1, n_routed={self.n_routed}], got {self.top_k}")
        if self.n_shared < 0 or self.d_expert < 1:
            raise ValueError("moe.n_shared must be >= 0 and moe.d_expert >= 1")
        if self.capacity_factor <= 0:
            raise ValueError(f"moe.capacity_factor must be > 0, got {self.capacity_factor}")
        if self.router not in ("sigmoid", "softmax"):
            raise ValueError(f"moe.router must be 'sigmoid' or 'softmax', got {self.router!r}")
        if self.balance not in ("bias", "aux", "none"):
            raise ValueError(f"moe.balance must be 'bias', 'aux' or 'none', got {self.balance!r}")
        if self.dispatch not in ("capacity", "dropless"):
            raise ValueError(f"moe.dispatch must be 'capacity' or 'dropless', got {self.dispatch!r}")
        if self.grouped_matmul not in ("tiles", "ragged"):
            raise ValueError(f"moe.grouped_matmul must be 'tiles' or 'ragged', got "
                             f"{self.grouped_matmul!r}")
        if self.dropless_tile < 1:
            raise ValueError(f"moe.dropless_tile must be >= 1, got {self.dropless_tile}")


@dataclass(frozen=True, kw_only=True, slots=True)
class EngramConfig:
    """Engram modules (hashed n-gram memory), docs/paper.md section 1.

    Attributes:
      layer_ids: 0-indexed layers that get an Engram module (added to the residual at layer start).
      max_ngram: N; orders 2..N are hashed (paper: 3).
      heads_per_ngram: hash heads per order (paper: 8).
      d_head: embedding width of one head; memory width M = (N - 1) * heads_per_ngram * d_head.
      table_sizes: base sub-table size per order 2..N; each head gets the next unused prime.
      conv_kernel: W, taps of the dilated depthwise causal conv (dilation N).
      seed: hashing seed.
      compress: use token compression before hashing (ablation switch).
      gate: use the context-aware scalar gate (off: alpha = 1).
      conv: use the short convolution (off: Y = gated value).
      table_init_std: std of the table init; None means 1 / sqrt(d_head) (as MaxText).
      offload: keep tables in host memory and feed the rows a batch needs (train-time switch).
      gate_per_branch: with ``hc_mult > 1``, one key projection, key/query norm and gate per
        residual branch (the paper and the public demo); False shares one gate across the branches
        (the paper's per-branch-gating ablation; layers/engram_branches.py). No effect at
        ``hc_mult = 1``.
    """

    layer_ids: tuple[int, ...]
    max_ngram: int = 3
    heads_per_ngram: int = 4
    d_head: int = 16
    table_sizes: tuple[int, ...]
    conv_kernel: int = 4
    seed: int = 0
    compress: bool = True
    gate: bool = True
    conv: bool = True
    table_init_std: float | None = None
    offload: bool = False
    gate_per_branch: bool = True

    def __post_init__(self):
        object.__setattr__(self, "layer_ids", tuple(int(x) for x in self.layer_ids))
        object.__setattr__(self, "table_sizes", tuple(int(x) for x in self.table_sizes))
        if not self.layer_ids:
            raise ValueError("engram.layer_ids is empty: use engram=None for a model without Engram")
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(f"engram.layer_ids has duplicates: {self.layer_ids}")
        if self.max_ngram < 2:
            raise ValueError(f"engram.max_ngram must be >= 2, got {self.max_ngram}")
        if len(self.table_sizes) != self.max_ngram - 1:
            raise ValueError(
                f"engram.table_sizes needs {self.max_ngram - 1} entries (orders 2..{self.max_ngram}), "
                f"got {len(self.table_sizes)}"
            )
        if min(self.table_sizes) < 2:
            raise ValueError(f"engram.table_sizes must be >= 2, got {self.table_sizes}")
        if self.heads_per_ngram < 1 or self.d_head < 1 or self.conv_kernel < 1:
            raise ValueError("engram.heads_per_ngram, d_head and conv_kernel must be >= 1")

    @property
    def n_heads(self) -> int:
        """G, hash heads per Engram layer."""
        return (self.max_ngram - 1) * self.heads_per_ngram

    @property
    def d_mem(self) -> int:
        """M, the concatenated memory width."""
        return self.n_heads * self.d_head

    def primes(self) -> dict[int, list[list[int]]]:
        from engram_jax.hashing import head_primes

        return head_primes(self.table_sizes, self.max_ngram, self.heads_per_ngram, self.layer_ids)

    def rows(self) -> dict[int, int]:
        """R per layer: rows of each layer's flat table."""
        return {lid: sum(sum(o) for o in p) for lid, p in self.primes().items()}


@dataclass(frozen=True, kw_only=True, slots=True)
class OverEncodingConfig:
    """OverEncoding input embeddings (Huang et al., "Over-Tokenized Transformer: Vocabulary is
    Generally Worth Scaling", ICML 2025, arXiv 2501.16975; docs/paper.md sections 3 and 8.1).

    The baseline Engram is compared against: hashed n-gram embeddings at the input layer only, no
    gate, no convolution, no contextual query. For each order n = 2..N the n-gram id at position i
    is ``sum_{j<n} x_{i-j} V^j`` (zeros before the start); sub-table t of the order reads row
    ``id mod (modulus + 2 t)`` and has its own linear projection to d_model; the token embedding
    and the (N - 1) * n_sub projected rows are averaged (layers/overencoding.py).

    Attributes:
      max_ngram: N; orders 2..N (paper: 3).
      n_sub: k, sub-tables per order, each with a slightly different modulus.
      d_sub: width of one sub-table (paper: d_model / ((N - 1) k)).
      modulus: m, the base modulus (rows of sub-table t: m + 2 t); must stay below 2**30 so the
        ids are computed exactly in int32 inside the model.
      table_init_std: std of the table init (1.0, as the token embedding's).
    """

    max_ngram: int = 3
    n_sub: int = 2
    d_sub: int = 16
    modulus: int
    table_init_std: float = 1.0

    def __post_init__(self):
        if self.max_ngram < 2:
            raise ValueError(f"overencoding.max_ngram must be >= 2, got {self.max_ngram}")
        if self.n_sub < 1 or self.d_sub < 1:
            raise ValueError("overencoding.n_sub and overencoding.d_sub must be >= 1")
        if not 2 <= self.modulus <= 2**30 - 2 * self.n_sub:
            raise ValueError(f"overencoding.modulus must be in [2, 2**30 - 2 n_sub], got {self.modulus}")

    @property
    def n_tables(self) -> int:
        """S = (N - 1) * n_sub sub-tables."""
        return (self.max_ngram - 1) * self.n_sub

    def moduli(self) -> list[int]:
        """Rows of each sub-table, order-major: [m, m + 2, ..] for n = 2, then for n = 3 ..."""
        return [self.modulus + 2 * t for _ in range(2, self.max_ngram + 1) for t in range(self.n_sub)]

    def rows(self) -> int:
        return sum(self.moduli())


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """A hybrid MoE + Engram decoder-only LM.

    Attributes:
      vocab_size: V (must match the tokenizer).
      d_model: D.
      n_layers: decoder blocks.
      n_heads: attention heads; head width d_model // n_heads.
      d_ff: hidden width of the dense SwiGLU FFN used by the first ``n_dense_layers`` blocks and by
        every block when ``moe`` is None.
      n_dense_layers: leading blocks with a dense FFN instead of an MoE (DeepSeek keeps layer 0 dense).
      seq_len: training context length (sets the attention FLOPs).
      moe: MoE part, or None for a dense model.
      engram: Engram part, or None for no Engram.
      overencoding: OverEncoding input n-gram embeddings (the paper's baseline), or None.
      hc_mult: M, residual branches: 1 is a plain residual; M > 1 builds hyper-connections
        (Zhu et al., arXiv 2409.19606; layers/hyperconn.py) with the multi-branch Engram
        (layers/engram_branches.py), as the paper's backbone (M = 4).
      tie_embeddings: share the input embedding with the LM head.
      rope_theta, norm_eps: RoPE base and the backbone RMSNorm epsilon (the Engram module's norms
        use the public demo's constants, layers/engram.py).
      dtype: compute dtype ("float32" or "bfloat16"); parameters are always float32.
      attention: the attention kernel: "auto" (cuDNN's fused attention on a CUDA GPU for bf16 /
        fp16 and head widths it supports, XLA's path elsewhere on an accelerator, the heads-major
        XLA layout on the CPU: ``layers.attention.attention_impl``), or one of "cudnn", "xla",
        "heads_major" to force it.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    n_dense_layers: int = 0
    seq_len: int = 256
    moe: MoEConfig | None = None
    engram: EngramConfig | None = None
    hc_mult: int = 1
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"
    overencoding: OverEncodingConfig | None = None
    attention: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head width d_model // n_heads must be even for RoPE")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ValueError(f"n_dense_layers must be in [0, n_layers={self.n_layers}]")
        if isinstance(self.hc_mult, bool) or not isinstance(self.hc_mult, int) or self.hc_mult < 1:
            raise ValueError(
                f"hc_mult must be an integer >= 1 (1: a plain residual, M > 1: M hyper-connection "
                f"branches), got {self.hc_mult!r}"
            )
        if self.attention not in ("auto", "cudnn", "xla", "heads_major"):
            raise ValueError(f"attention must be auto, cudnn, xla or heads_major, got "
                             f"{self.attention!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.engram is not None:
            bad = [i for i in self.engram.layer_ids if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(f"engram.layer_ids {bad} outside [0, n_layers={self.n_layers})")

    @property
    def d_attn_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        if self.moe is None:
            return ()
        return tuple(range(self.n_dense_layers, self.n_layers))

    def param_counts(self) -> dict[str, int]:
        from engram_jax.counting import param_counts

        return param_counts(self)

    def flops_per_token(self, *, executed: bool = False) -> float:
        from engram_jax.counting import flops_per_token

        return flops_per_token(self, executed=executed)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data; options added later are left out while at their default
        (``LATE_FIELDS``), so a new option never changes an existing config's ``hash()``."""
        return _prune_late(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; keys of options added later may be absent (their default)."""
        d = dict(d)
        if d.get("moe") is not None and not isinstance(d["moe"], MoEConfig):
            d["moe"] = MoEConfig(**d["moe"])
        if d.get("engram") is not None and not isinstance(d["engram"], EngramConfig):
            d["engram"] = EngramConfig(**d["engram"])
        if d.get("overencoding") is not None and not isinstance(d["overencoding"], OverEncodingConfig):
            d["overencoding"] = OverEncodingConfig(**d["overencoding"])
        return cls(**d)

    def with_overrides(self, overrides: dict[str, Any]) -> ModelConfig:
        """Apply dotted overrides such as ``{"moe.n_routed": 8, "engram": None, "d_model": 128}``."""
        d = _full_dict(self)  # late options too, so they can be set while at their default
        for key, value in overrides.items():
            parts = key.split(".")
            node = d
            for p in parts[:-1]:
                if node.get(p) is None:
                    raise ValueError(f"cannot set {key!r}: {p!r} is None in this config")
                node = node[p]
            if parts[-1] not in node:
                raise ValueError(f"unknown config key {key!r}")
            node[parts[-1]] = value
        return ModelConfig.from_dict(d)


# Fields added after results were first recorded, per config class: ``to_dict`` (and so
# ``to_json``, ``hash`` and the grid files of a sweep) leaves them out while they hold their
# default, so committed results keep matching the configs that produced them. A new option is
# added here with a default that reproduces the old behaviour.
LATE_FIELDS: dict[str, tuple[str, ...]] = {
    "ModelConfig": ("overencoding", "attention"),
    "MoEConfig": ("dispatch", "grouped_matmul", "dropless_tile"),
    "EngramConfig": ("gate_per_branch",),
    "OverEncodingConfig": (),
    "TrainConfig": ("final_eval_tokens", "optimizer", "muon_lr_mult", "loss_chunk",
                    "mesh", "grad_accum", "remat"),
}


def _prune_late(obj) -> dict[str, Any]:
    out = {}
    late = LATE_FIELDS.get(type(obj).__name__, ())
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.name in late and v == f.default:
            continue
        out[f.name] = _prune_late(v) if dataclasses.is_dataclass(v) else (
            list(v) if isinstance(v, tuple) else v)
    return out


def _full_dict(obj) -> dict[str, Any]:
    """Every field as plain data, late options included (``with_overrides`` edits this)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = _full_dict(v) if dataclasses.is_dataclass(v) else (
            list(v) if isinstance(v, tuple) else v)
    return out


def train_dict(tcfg: TrainConfig) -> dict[str, Any]:
    """A TrainConfig as plain data, late options at their default left out (see LATE_FIELDS)."""
    return _prune_late(tcfg)


# ---------------------------------------------------------------------------------------------
# presets

PRESETS: dict[str, ModelConfig] = {
    # Tests: small, with routed experts and Engram tables.
    "tiny": ModelConfig(
        vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=128, seq_len=64,
        moe=MoEConfig(n_routed=8, top_k=2, n_shared=1, d_expert=32),
        engram=EngramConfig(layer_ids=(1,), heads_per_ngram=2, d_head=8, table_sizes=(257, 257)),
    ),
    # A dense backbone of the same width as tiny (for comparisons and the dense-equivalence tests).
    "tiny-dense": ModelConfig(
        vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=128, seq_len=64,
    ),
    # --- sweep bases (pure MoE at rho = 1; allocation.py turns them into iso-parameter hybrids) ---
    # Shaped like the paper's budgets: P_tot (no embeddings) ~10x P_act, E0 - top_k a multiple of 10
    # so the rho grid 1.0 .. 0.4 is realised with whole experts. Budgets: allocation.BUDGETS.
    "smoke": ModelConfig(
        vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=128, seq_len=64,
        moe=MoEConfig(n_routed=42, top_k=2, n_shared=1, d_expert=64),
    ),
    "cpu-small": ModelConfig(
        vocab_size=2048, d_model=128, n_layers=4, n_heads=4, d_ff=256, seq_len=128,
        moe=MoEConfig(n_routed=42, top_k=2, n_shared=1, d_expert=128),
    ),
    # The paper-regime CPU ladder (allocation.BUDGETS "cpu-1e12" .. "cpu-1e13"): P_tot/P_act ~ 9.7,
    # 40 tokens per active parameter, named by C = 6 P_act D. Vocabulary 512 keeps the embedding
    # and LM head from dominating the compute of such small models.
    "cpu-1e12": ModelConfig(
        vocab_size=512, d_model=48, n_layers=2, n_heads=4, d_ff=96, seq_len=128,
        moe=MoEConfig(n_routed=42, top_k=2, n_shared=1, d_expert=48),
    ),
    "cpu-3e12": ModelConfig(
        vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=128, seq_len=128,
        moe=MoEConfig(n_routed=42, top_k=2, n_shared=1, d_expert=64),
    ),
    "cpu-1e13": ModelConfig(
        vocab_size=512, d_model=72, n_layers=3, n_heads=4, d_ff=144, seq_len=128,
        moe=MoEConfig(n_routed=42, top_k=2, n_shared=1, d_expert=72),
    ),
    # The paper-shaped candidate regime (allocation.BUDGETS "cpu2k-5e12"): vocabulary 2048 (the
    # LM head holds 0.7x the active parameters, the paper's 129k x 2560 head 0.6x), 4 layers,
    # P_tot/P_act ~ 11, experts twice d_model wide so that the router stays under 6% of the active
    # parameters; trained on 100 tokens per active parameter.
    "cpu2k-5e12": ModelConfig(
        vocab_size=2048, d_model=32, n_layers=4, n_heads=4, d_ff=64, seq_len=128,
        moe=MoEConfig(n_routed=42, top_k=2, n_shared=1, d_expert=64),
    ),
    # The paper-shaped ladder (allocation.BUDGETS "ladder2k-2e12" .. "ladder2k-2e13"): cpu2k-5e12's
    # regime (vocabulary 2048, d_model 32, top-2 + 1 shared, Engram d_mem = d_model / 2) grown in
    # depth and expert width, the axes left at d_model 32 (d_mem = d / 2 with 8 heads per order
    # needs d_model a multiple of 32, and 64 costs 4x). 32 routed experts (E0 - k = 30: P_tot /
    # P_act 8.3-9.6, the paper's ~10) keep the removed router columns small enough for every rung
    # to stay within the 2% tolerance from rho 1.0 down to 0.3; cpu2k-5e12's 42 lose 2.4% there.
    "ladder2k-2e12": ModelConfig(
        vocab_size=2048, d_model=32, n_layers=3, n_heads=4, d_ff=64, seq_len=128,
        moe=MoEConfig(n_routed=32, top_k=2, n_shared=1, d_expert=48),
    ),
    "ladder2k-5e12": ModelConfig(
        vocab_size=2048, d_model=32, n_layers=4, n_heads=4, d_ff=64, seq_len=128,
        moe=MoEConfig(n_routed=32, top_k=2, n_shared=1, d_expert=64),
    ),
    "ladder2k-2e13": ModelConfig(
        vocab_size=2048, d_model=32, n_layers=5, n_heads=4, d_ff=64, seq_len=128,
        moe=MoEConfig(n_routed=32, top_k=2, n_shared=1, d_expert=112),
    ),
    # The paper-regime GPU ladder (allocation.BUDGETS "gpu-1e17" .. "gpu-1e18"), shaped like the
    # paper's MoE: 106 fine-grained routed experts of width d_model / 2, top-6, two shared
    # (P_tot/P_act ~ 10, E0 - k = 100), vocabulary 32768, sequences of 1024, 10-14 layers.
    "gpu-1e17": ModelConfig(
        vocab_size=32768, d_model=256, n_layers=12, n_heads=4, d_ff=1024, seq_len=1024,
        moe=MoEConfig(n_routed=106, top_k=6, n_shared=2, d_expert=128),
    ),
    "gpu-3e17": ModelConfig(
        vocab_size=32768, d_model=320, n_layers=14, n_heads=5, d_ff=1280, seq_len=1024,
        moe=MoEConfig(n_routed=106, top_k=6, n_shared=2, d_expert=160),
    ),
    "gpu-1e18": ModelConfig(
        vocab_size=32768, d_model=512, n_layers=10, n_heads=8, d_ff=2048, seq_len=1024,
        moe=MoEConfig(n_routed=106, top_k=6, n_shared=2, d_expert=256),
    ),
    "gpu-s": ModelConfig(
        vocab_size=8192, d_model=512, n_layers=8, n_heads=8, d_ff=1536, seq_len=512,
        moe=MoEConfig(n_routed=42, top_k=2, n_shared=1, d_expert=512),
    ),
    "gpu-m": ModelConfig(
        vocab_size=16384, d_model=768, n_layers=12, n_heads=12, d_ff=2048, seq_len=1024,
        moe=MoEConfig(n_routed=64, top_k=4, n_shared=1, d_expert=512),
    ),
}


def preset(name: str) -> ModelConfig:
    """The named preset; raises ValueError listing the known names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """One training run.

    Attributes:
      steps: optimizer steps; batch_size: sequences per step (each ``model.seq_len`` tokens).
      lr: peak learning rate (backbone); warmup_steps: linear warmup; min_lr_ratio: cosine floor.
      weight_decay: AdamW decay for matrices (not norms, biases or Engram tables).
      engram_lr_mult / engram_weight_decay: the Engram table group (paper: 5x lr, no decay).
      grad_clip: global-norm clip (0 disables).
      eval_every / eval_batches: validation cadence and size; log_every: metrics cadence.
      ckpt_every: checkpoint cadence in steps (0: only at the end).
      seed: parameter init + batch sampling seed.
      compute_dtype: "auto" (bf16 on GPU, f32 on CPU), "float32" or "bfloat16".
      prefetch: batches prepared ahead by the background thread.
      final_eval_tokens: the final validation loss (the record's ``val_loss``) is measured on
        at least this many tokens of evenly spaced, non-overlapping windows (or the whole split
        if smaller), the same windows for every trial of a corpus and shape; 0 uses the periodic
        evaluation set (``eval_batches``). Allocation differences are ~1% of the loss, so grids
        set this to about 1M (design: science practice).
      optimizer: "adamw" (every group AdamW) or "muon": the backbone's matrices (attention,
        dense and expert FFNs, Engram and OverEncoding projections) take Muon (Jordan et al.
        2024; ``optax.contrib.scale_by_muon``, consistent-RMS scaling 0.2 of Liu et al., arXiv
        2502.16982, so AdamW learning rates carry over) with decoupled ``weight_decay``, while
        embeddings, LM head, router, norms, biases and the memory tables keep their AdamW groups
        (tables at ``engram_lr_mult`` x the rate, no decay), as the Engram paper trains
        (docs/paper.md section 1.8 (Training)). See ``optim.make_optimizer``.
      muon_lr_mult: the Muon group's peak rate is ``lr * muon_lr_mult``.
      mesh: the devices of one trial and how they split it (``parallel.MeshShape``: data, fsdp
        and expert axes; a mapping ``{data: 2, fsdp: 2, expert: 2}`` or ``"data=2,fsdp=2"`` is
        read into one). Default one device, the program without a mesh. See engram_jax/parallel.
      grad_accum: micro-batches per step: the batch is split into this many (sequences i,
        i + grad_accum, ...), their gradients summed before one update; the same step as the
        whole batch to float rounding for dense models and dropless MoE (capacity buffers and
        the auxiliary balance loss are per micro-batch), with a micro-batch's activations alive.
      remat: "none" keeps every activation for the backward pass; "block" keeps only each
        decoder block's input and recomputes the block in the backward pass (``nnx.remat``).
      loss_chunk: 0 computes the LM head's float32 logits [B, T, V] whole (as every committed
        result did); n > 0 computes the head and the cross-entropy over chunks of n positions
        under ``jax.checkpoint`` (``optim.chunked_cross_entropy``): the same loss to rounding,
        with one chunk's logits [n, V] alive at a time.
    """

    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    engram_lr_mult: float = 5.0
    engram_weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    ckpt_every: int = 0
    seed: int = 0
    compute_dtype: str = "auto"
    prefetch: int = 4
    final_eval_tokens: int = 0
    optimizer: str = "adamw"
    muon_lr_mult: float = 1.0
    loss_chunk: int = 0
    mesh: MeshShape = MeshShape()
    grad_accum: int = 1
    remat: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "mesh", MeshShape.parse(self.mesh))
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if isinstance(self.grad_accum, bool) or not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise ValueError(f"grad_accum must be an integer >= 1, got {self.grad_accum!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} does not split into grad_accum="
                             f"{self.grad_accum} equal micro-batches")
        if self.remat not in ("none", "block"):
            raise ValueError(f"remat must be 'none' or 'block', got {self.remat!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.final_eval_tokens < 0:
            raise ValueError(f"final_eval_tokens must be >= 0, got {self.final_eval_tokens}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be >= 0 (0: the full logits), got {self.loss_chunk}")
        if self.muon_lr_mult <= 0:
            raise ValueError(f"muon_lr_mult must be > 0, got {self.muon_lr_mult}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be auto, float32 or bfloat16, got {self.compute_dtype!r}")
