"""Which mesh axes split each parameter: logical axes by parameter path, and one rule table.

Pure Python (no JAX), so the memory plan and the sweep driver use the same rules as training.

Layers do not name mesh axes. Each parameter gets logical axes from its path (``logical_axes``:
the name of the leaf, and for the SwiGLU weights whether they hold a batch of experts), and
``RULES`` maps each logical axis to the mesh axes that split it. The optimizer's moments and the
gradients have the parameters' paths as suffixes of theirs, so the same lookup shards them like
their parameters. Anything without a rule (norm scales, biases, the Engram conv taps, the
hyper-connections' small vectors, routing biases, step counters) is replicated.
"""

from __future__ import annotations

import math

from engram_jax.parallel.mesh import AXES, MeshShape

# Logical axis -> mesh axes (None: not split). The one place that says how a trial is sharded.
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": AXES,  # sequences of a batch: split over every device
    "embed": ("fsdp",),  # the model width of every matrix: FSDP
    "expert": ("expert",),  # the routed experts of a MoE layer
    "table_rows": AXES,  # Engram / OverEncoding table rows: over every device (padded to fit)
    "vocab": None,
    "heads": None,
    "head_dim": None,
    "mlp": None,
    "mem": None,  # the Engram memory width (heads x d_head) of W_V / W_K
    "sub": None,  # OverEncoding sub-tables
    "branches": None,  # hyper-connection branch mixing weights
    "table_width": None,
}

_EXPERT_SWIGLU = {"w_gate": ("expert", "embed", "mlp"), "w_up": ("expert", "embed", "mlp"),
                  "w_down": ("expert", "mlp", "embed")}
_BY_NAME: dict[tuple[str, int], tuple[str, ...]] = {
    ("embed", 2): ("vocab", "embed"),
    ("lm_head", 2): ("embed", "vocab"),
    ("wq", 3): ("embed", "heads", "head_dim"),
    ("wk", 3): ("embed", "heads", "head_dim"),
    ("wv", 3): ("embed", "heads", "head_dim"),
    ("wo", 3): ("heads", "head_dim", "embed"),
    ("w_gate", 2): ("embed", "mlp"),
    ("w_up", 2): ("embed", "mlp"),
    ("w_down", 2): ("mlp", "embed"),
    ("w_router", 2): ("embed", None),
    ("table", 2): ("table_rows", "table_width"),
    ("w_v", 2): ("mem", "embed"),
    ("w_k", 2): ("mem", "embed"),
    ("proj", 3): ("sub", "table_width", "embed"),
    ("dynamic_alpha_fn", 2): ("embed", "branches"),
}


def path_names(path) -> list[str]:
    """The names along a pytree path (dict keys, attribute names, sequence indices as strings),
    without an ``nnx.Variable``'s own trailing ``value``."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return names[:-1] if names and names[-1] == "value" else names


def logical_axes(names: list[str], ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the leaf at ``names`` with ``ndim`` dimensions; all None (replicated) for
    a leaf without a rule, and for scalars."""
    if not names:
        return (None,) * ndim
    name = names[-1]
    if ndim == 3 and name in _EXPERT_SWIGLU and "moe" in names:
        return _EXPERT_SWIGLU[name]
    return _BY_NAME.get((name, ndim), (None,) * ndim)


def mesh_axes(logical: tuple[str | None, ...]) -> tuple[tuple[str, ...] | None, ...]:
    """Mesh axes splitting each dimension, per ``RULES``."""
    return tuple(RULES.get(ax) if ax is not None else None for ax in logical)


def spec(names: list[str], shape: tuple[int, ...], mesh: MeshShape) -> tuple:
    """The partition spec (one entry per dimension: None or a tuple of mesh axes) of a leaf of
    ``shape`` at ``names`` on ``mesh``. Mesh axes of size 1 are left out (they split nothing),
    so on one device every spec is fully replicated; a dimension the mesh axes do not divide
    raises ValueError (``check_mesh`` and ``padded_rows`` prevent that for the model's
    parameters)."""
    out = []
    for dim, axes in zip(shape, mesh_axes(logical_axes(names, len(shape))), strict=True):
        axes = tuple(a for a in axes or () if getattr(mesh, a) > 1)
        ways = math.prod(getattr(mesh, a) for a in axes)
        if dim % ways:
            raise ValueError(f"{'/'.join(names)}: dimension {dim} does not split over mesh axes "
                             f"{axes} ({ways} ways)")
        out.append(axes or None)
    return tuple(out)


def is_table(names: list[str], ndim: int) -> bool:
    return logical_axes(names, ndim)[:1] == ("table_rows",)


def padded_rows(rows: int, mesh: MeshShape) -> int:
    """Rows a table of ``rows`` rows is stored with on ``mesh``: the next multiple of the devices
    its rows are split over (``RULES['table_rows']``). The padding rows are zero, never looked up,
    get no gradient and stay zero; on one device there are none."""
    ways = math.prod(getattr(mesh, a) for a in RULES["table_rows"])
    return -(-rows // ways) * ways


def per_device_params(cfg, mesh: MeshShape) -> dict[str, int]:
    """Parameters one device holds on ``mesh`` (the largest share where a split is uneven), from
    the config alone, as ``spec`` splits the model's leaves.

    Returns {"total": per device, "replicated": held whole by every device, "fsdp": matrices split
    along the model width, "experts": routed experts (split over expert and fsdp), "tables":
    Engram and OverEncoding tables with their padding (split over every device; 0 when offloaded)}.
    """
    c = cfg.param_counts()
    D, L, M = cfg.d_model, cfg.n_layers, cfg.hc_mult
    n_dev = mesh.size
    tables = 0
    if cfg.engram is not None and not cfg.engram.offload:
        e = cfg.engram
        tables += sum(padded_rows(r, mesh) for r in e.rows().values()) * e.d_head // n_dev
    if cfg.overencoding is not None:
        oe = cfg.overencoding
        tables += padded_rows(oe.rows(), mesh) * oe.d_sub // n_dev
    experts = c["routed_experts"] // (mesh.expert * mesh.fsdp)
    # Replicated leaves: every norm scale and bias, the Engram conv taps, the hyper-connections'
    # vectors (their [D, M + 1] dynamic weights are split).
    replicated = c["norms"]
    if cfg.engram is not None:
        e = cfg.engram
        per = D  # b_V
        if e.gate:
            per += (M if e.gate_per_branch else 1) * 3 * D  # b_K and the two gate norms
        if e.conv:
            per += M * D + e.conv_kernel * M * D  # conv norms and taps
        replicated += len(e.layer_ids) * per
    if M > 1:
        from engram_jax.counting import hyperconn_params

        replicated += 2 * L * (hyperconn_params(cfg) - D * (M + 1))
    tables_total = c["engram_tables"] + c.get("overencoding_tables", 0)
    split = c["total"] - c["routed_experts"] - tables_total - replicated
    fsdp = split // mesh.fsdp
    return {"total": replicated + fsdp + experts + tables, "replicated": replicated,
            "fsdp": fsdp, "experts": experts, "tables": tables}
