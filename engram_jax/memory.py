"""Device-memory plan of a training step, from the configs alone (no JAX).

A sweep checks it before a GPU or TPU grid starts, so a batch that cannot fit fails at once with
a message instead of an hour in. The plan is an upper-bound estimate, not XLA's allocation:

- parameters, gradients: 4 bytes per parameter each (parameters are float32);
- optimizer state: AdamW's two moments, 8 bytes per parameter;
- activations kept for the backward pass (no rematerialisation), per token and layer in the
  compute dtype: the residual stream and norms, q/k/v/output, the attention scores and
  probabilities (``jax.nn.dot_product_attention``'s XLA path materialises [B, N, T, T]; the
  scores counted in float32), the SwiGLU or MoE hidden states (MoE: capacity buffers, cf * K
  slots per token, or the dropless path's rows), the Engram memory read and its gate/conv; plus
  the float32 logits and their gradient over the vocabulary: for every position, or with
  ``TrainConfig.loss_chunk`` for one chunk of that many positions
  (``optim.chunked_cross_entropy``);
- a fixed 1 GiB for XLA's workspace and the input batch.

Per device of the trial's mesh (``TrainConfig.mesh``, engram_jax/parallel): parameters, gradients
and moments as the mesh splits them (``parallel.rules.per_device_params``), activations and
logits for the device's slice of the batch. ``TrainConfig.grad_accum`` counts the activations of
one micro-batch and a second gradient buffer (the sum the micro-batches add to);
``TrainConfig.remat = "block"`` keeps each block's input for the backward pass plus one block's
activations (the block being recomputed).

Measured on an H200 (JAX 0.11.2), two steps at the grids' batches: ``gpu-s`` rho 0.4 peaked at
17.8 GiB (plan 20.4), ``gpu-m`` rho 0.4 at 61.6 GiB (plan 65.7).

Offloaded Engram tables (``engram.offload``) and their moments live in host memory and are left
out. Shapes: B batch, T sequence, D model, N heads, F hidden, E experts, K top-k, V vocabulary.

On a GPU, JAX's allocator does not hand out the whole device: it preallocates a fraction of its
total memory (75% unless ``XLA_PYTHON_CLIENT_MEM_FRACTION``, or its newer name
``XLA_CLIENT_MEM_FRACTION``, says otherwise) and serves every buffer from that pool; only
``XLA_PYTHON_CLIENT_ALLOCATOR=platform`` allocates from the whole device.
``jax_memory_fraction`` reads those settings from an environment, so a plan is held against what
the trial's process can actually use.
"""

from __future__ import annotations

from collections.abc import Mapping

from engram_jax.config import ModelConfig, TrainConfig

GiB = 1024**3
WORKSPACE = 1 * GiB
JAX_DEFAULT_FRACTION = 0.75  # JAX's GPU allocator preallocates this share of the device
FRACTION_VARS = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION")

# Device memory of the accelerators Ray names in its ``accelerator_type:<name>`` resource (GiB;
# where a type comes in two sizes, the smaller).
DEVICE_MEMORY_GIB = {
    "H100": 80, "H200": 141, "B200": 180, "A100": 40, "A100-40G": 40, "A100-80G": 80, "L4": 24,
    "A10G": 24, "L40S": 48, "V100": 16, "T4": 16,
    "TPU-V4": 32, "TPU-V5LITEPOD": 16, "TPU-V5E": 16, "TPU-V5P": 95, "TPU-V6E": 32,
}


def memory_plan(cfg: ModelConfig, tcfg: TrainConfig, *, platform: str = "cuda") -> dict[str, int]:
    """Bytes one device needs for a training step of ``cfg`` at ``tcfg.batch_size``.

    Args:
      cfg, tcfg: the trial's model and training configs.
      platform: "cuda", "tpu" or "cpu" (sets the compute dtype of ``compute_dtype="auto"``).

    Returns:
      {"params", "grads", "optimizer", "activations", "logits", "workspace", "total"} in bytes.
    """
    from engram_jax.parallel.rules import per_device_params

    mesh = tcfg.mesh
    on_device = per_device_params(cfg, mesh)["total"]  # offloaded tables left out
    dtype = tcfg.compute_dtype
    if dtype == "auto":
        dtype = "float32" if platform == "cpu" else "bfloat16"
    b = 2 if dtype == "bfloat16" else 4
    B, T, D, N = tcfg.batch_size, cfg.seq_len, cfg.d_model, cfg.n_heads
    tokens = B * T // (tcfg.grad_accum * mesh.batch_ways)  # one micro-batch on one device

    attn_per_token = b * 7 * D + (4 + b) * N * T  # norm, residual, q, k, v, o, proj + scores/probs
    dense_ffn = b * (2 * D + 3 * cfg.d_ff)
    per_layer = []
    for i in range(cfg.n_layers):
        ffn = dense_ffn
        if cfg.moe is not None and i >= cfg.n_dense_layers:
            m = cfg.moe
            slots = m.capacity_factor * m.top_k
            if m.dispatch == "dropless":  # the tiled (or exact) rows of the dropless buffer
                from engram_jax.counting import routed_rows_executed

                slots = routed_rows_executed(cfg, tokens) / tokens
            ffn = (b * (2 * D + slots * (2 * D + 3 * m.d_expert) + m.n_shared * 3 * m.d_expert)
                   + 4 * 2 * m.n_routed)  # router logits and gates in float32
        eng = 0
        if cfg.engram is not None and i in cfg.engram.layer_ids:
            e = cfg.engram
            width = (e.max_ngram - 1) * e.heads_per_ngram * e.d_head
            eng = b * (2 * width + 6 * D)
        per_layer.append(attn_per_token + ffn + eng)
    activations = tokens * sum(per_layer)
    if tcfg.remat == "block":  # the blocks' inputs, and one block's activations at a time
        activations = tokens * (cfg.n_layers * b * cfg.hc_mult * D + max(per_layer))
    # float32 logits, their gradient, the head's output in the compute dtype: for every position,
    # or for one chunk of the chunked loss at a time
    logit_rows = min(tcfg.loss_chunk, tokens) if tcfg.loss_chunk else tokens
    logits = logit_rows * cfg.vocab_size * (4 + 4 + b)
    grads = 4 * on_device * (2 if tcfg.grad_accum > 1 else 1)
    plan = {"params": 4 * on_device, "grads": grads, "optimizer": 8 * on_device,
            "activations": int(activations), "logits": int(logits), "workspace": WORKSPACE}
    plan["total"] = sum(plan.values())
    return plan


def describe(plan: dict[str, int]) -> str:
    return ", ".join(f"{k} {v / GiB:.1f}" for k, v in plan.items() if k != "total") + \
        f" GiB; total {plan['total'] / GiB:.1f} GiB"


def parse_fraction(value: str | float, name: str = "memory fraction") -> float:
    """A memory fraction in (0, 1]; ValueError naming ``name`` otherwise."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}") from None
    if not 0 < f <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return f


def jax_memory_fraction(environ: Mapping[str, str]) -> tuple[float, str]:
    """(share of a GPU's total memory that JAX's allocator may use, why) in a process whose
    environment is ``environ``: 1.0 with ``XLA_PYTHON_CLIENT_ALLOCATOR=platform``, else
    ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (or ``XLA_CLIENT_MEM_FRACTION``), else JAX's 0.75.

    Raises ValueError where JAX would refuse the settings (both fraction variables set, a value
    outside (0, 1]).
    """
    if environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "").lower() == "platform":
        return 1.0, "XLA_PYTHON_CLIENT_ALLOCATOR=platform: buffers come from the whole device"
    given = [(k, environ[k]) for k in FRACTION_VARS if environ.get(k)]
    if len(given) > 1:
        raise ValueError(f"both {FRACTION_VARS[0]} and {FRACTION_VARS[1]} are set (JAX refuses "
                         "that); keep one")
    if given:
        name, value = given[0]
        return parse_fraction(value, name), f"{name}={value}"
    return JAX_DEFAULT_FRACTION, f"JAX's default: it preallocates {JAX_DEFAULT_FRACTION:.0%}"
