"""RMSNorm, SwiGLU and parameter initialisers shared by the layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


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
        g = x_BxTxD @ self.w_gate[...].astype(dt)
        u = x_BxTxD @ self.w_up[...].astype(dt)
        return (jax.nn.silu(g) * u) @ self.w_down[...].astype(dt)
