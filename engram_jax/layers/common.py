"""RMSNorm, SwiGLU and parameter initialisers shared by the layers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


@jax.custom_vjp
def _project_cpu(x_SxI: jax.Array, w_IxO: jax.Array) -> jax.Array:
    """x @ w, with or without a leading group axis on both ([G, S, I] @ [G, I, O])."""
    return x_SxI @ w_IxO


def _project_cpu_fwd(x_SxI, w_IxO):
    return x_SxI @ w_IxO, (x_SxI, w_IxO)


def _project_cpu_bwd(res, dy_SxO):
    x_SxI, w_IxO = res
    # The weight gradient contracts over the tokens, the major axis of both operands. Left to
    # itself XLA's CPU backend transposes the (larger) output gradient and runs a dot with both
    # operands transposed, two to three times slower than this: x transposed into an [I, S] copy,
    # then a plain [I, S] @ [S, O] matmul.
    t = lambda a: jnp.swapaxes(a, -1, -2)  # noqa: E731
    return dy_SxO @ t(w_IxO), t(x_SxI) @ dy_SxO


_project_cpu.defvjp(_project_cpu_fwd, _project_cpu_bwd)


def project(x: jax.Array, w: jax.Array, n_in: int = 1, *,
            preferred_element_type=None) -> jax.Array:
    """Contract the last ``n_in`` axes of ``x`` with the first ``n_in`` of ``w``
    (``einsum("btd,dnh->btnh")`` for n_in 1, ``"btnh,nhd->btd"`` for 2).

    The same product as the einsum, and on every backend but the CPU the einsum itself. On the
    CPU with float32 operands its weight gradient is computed as ``x^T @ dy`` with ``x^T``
    materialised (``_project_cpu``), which XLA runs faster there than the layouts it picks for the
    einsum's transpose; the numbers are those of the einsum up to float rounding in the weight
    gradient."""
    lead, inner = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in:]
    if w.shape[:n_in] != inner:
        raise ValueError(f"project: x's last axes {inner} do not match w's first {w.shape[:n_in]}")
    out = w.shape[n_in:]
    if jax.default_backend() != "cpu" or x.dtype != jnp.float32 or w.dtype != jnp.float32:
        return jnp.tensordot(x, w, axes=n_in, preferred_element_type=preferred_element_type)
    n_i = math.prod(inner)
    y = _project_cpu(x.reshape(-1, n_i), w.reshape(n_i, -1))
    return y.reshape(*lead, *out)


def project_grouped(x_GxSxI: jax.Array, w_GxIxO: jax.Array) -> jax.Array:
    """``einsum("gsi,gio->gso")`` (the experts' matmuls), with ``project``'s weight gradient on
    the CPU."""
    if jax.default_backend() != "cpu" or x_GxSxI.dtype != jnp.float32 or w_GxIxO.dtype != jnp.float32:
        return jnp.einsum("gsi,gio->gso", x_GxSxI, w_GxIxO)
    return _project_cpu(x_GxSxI, w_GxIxO)


def normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> nnx.Param:
    """A float32 parameter drawn from N(0, std^2)."""
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale (init 1), D parameters."""

    def __init__(self, dim: int, *, eps: float = 1e-6):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class SwiGLU(nnx.Module):
    """down(silu(x W_gate) * (x W_up)), 3 * D * F parameters, no biases."""

    def __init__(self, d_model: int, d_hidden: int, *, n_layers: int, rngs: nnx.Rngs):
        self.w_gate = normal(rngs, (d_model, d_hidden), d_model**-0.5)
        self.w_up = normal(rngs, (d_model, d_hidden), d_model**-0.5)
        self.w_down = normal(rngs, (d_hidden, d_model), (d_hidden * 2 * n_layers) ** -0.5)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        dt = x_BxTxD.dtype
        g = project(x_BxTxD, self.w_gate[...].astype(dt))
        u = project(x_BxTxD, self.w_up[...].astype(dt))
        return project(jax.nn.silu(g) * u, self.w_down[...].astype(dt))
