"""The CPU attention path (heads-major layout) computes jax.nn.dot_product_attention's causal
attention: outputs and gradients agree to float32 rounding, and it stays causal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.layers.attention import causal_attention_heads_major


@pytest.mark.parametrize("shape", [(2, 16, 4, 12), (3, 33, 2, 8), (1, 128, 4, 18)])
def test_heads_major_equals_dot_product_attention(shape):
    kq, kk, kv, kc = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in (kq, kk, kv))
    ct = jax.random.normal(kc, shape, jnp.float32)

    def ref(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    np.testing.assert_allclose(causal_attention_heads_major(q, k, v), ref(q, k, v),
                               rtol=1e-5, atol=1e-5)
    g_new = jax.grad(lambda *a: jnp.sum(causal_attention_heads_major(*a) * ct), argnums=(0, 1, 2))
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * ct), argnums=(0, 1, 2))
    for a, b in zip(g_new(q, k, v), g_ref(q, k, v)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_heads_major_is_causal():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 10, 2, 4)) for i in range(3))
    out = causal_attention_heads_major(q, k, v)
    k2 = k.at[:, 6:].set(9.0)
    v2 = v.at[:, 6:].set(-9.0)
    np.testing.assert_array_equal(causal_attention_heads_major(q, k2, v2)[:, :6], out[:, :6])
    assert not np.allclose(causal_attention_heads_major(q, k2, v2)[:, 6:], out[:, 6:])


def test_heads_major_rejects_cross_attention():
    q = jnp.zeros((1, 4, 2, 4))
    with pytest.raises(ValueError, match="4 queries but 5 keys"):
        causal_attention_heads_major(q, jnp.zeros((1, 5, 2, 4)), jnp.zeros((1, 5, 2, 4)))
