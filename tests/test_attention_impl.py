"""Which attention kernel runs (``layers.attention.attention_impl``): cuDNN's fused attention on a
CUDA GPU for bf16 / fp16 at supported head widths, XLA's path elsewhere on an accelerator, the
heads-major layout on the CPU, any of them forced by ``ModelConfig.attention``; the kernels give
the same outputs and gradients (XLA vs heads-major here, cuDNN vs XLA on a GPU)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.config import ModelConfig, preset
from engram_jax.layers import attention as attn_lib
from engram_jax.layers.attention import Attention, attention_impl, causal_attention


def test_auto_on_the_cpu_is_the_heads_major_path():
    assert jax.default_backend() == "cpu"
    for dt in (jnp.float32, jnp.bfloat16):
        assert attention_impl("auto", dt, 64) == "heads_major"
        assert not attn_lib.cudnn_supported(dt, 64)
    for forced in ("xla", "cudnn", "heads_major"):
        assert attention_impl(forced, jnp.float32, 12) == forced


def _fake_gpu(monkeypatch, cc="9.0", platform="cuda 12080"):
    dev = types.SimpleNamespace(compute_capability=cc, client=types.SimpleNamespace(
        platform_version=platform), device_kind="NVIDIA H200")
    monkeypatch.setattr(attn_lib.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attn_lib.jax, "devices", lambda *a: [dev])


@pytest.mark.parametrize("cc,platform,dtype,head,want", [
    ("9.0", "cuda 12080", jnp.bfloat16, 64, "cudnn"),
    ("8.0", "cuda 12080", jnp.float16, 128, "cudnn"),
    ("9.0", "cuda 12080", jnp.float32, 64, "xla"),   # cuDNN's flash attention: bf16 / fp16
    ("9.0", "cuda 12080", jnp.bfloat16, 12, "xla"),  # not a multiple of 8
    ("9.0", "cuda 12080", jnp.bfloat16, 256, "xla"),  # over 128
    ("7.0", "cuda 12080", jnp.bfloat16, 64, "xla"),  # before Ampere
    ("", "rocm 6.2", jnp.bfloat16, 64, "xla"),
])
def test_auto_on_a_gpu(monkeypatch, cc, platform, dtype, head, want):
    _fake_gpu(monkeypatch, cc, platform)
    assert attention_impl("auto", dtype, head) == want


def test_the_xla_path_equals_the_heads_major_path():
    rng = np.random.default_rng(0)
    q, k, v, ct = (jnp.asarray(rng.normal(size=(2, 24, 3, 8)), jnp.float32) for _ in range(4))

    def loss(impl):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(causal_attention(q, k, v, impl) * ct),
                                          argnums=(0, 1, 2)))

    (a, ga), (b, gb) = loss("xla")(q, k, v), loss("heads_major")(q, k, v)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention kernel"):
        causal_attention(q, k, v, "flash")


def test_forced_kernel_in_the_layer_and_config():
    layer_auto = Attention(16, 2, n_layers=1, rope_theta=1e4, rngs=nnx.Rngs(0))
    layer_xla = Attention(16, 2, n_layers=1, rope_theta=1e4, rngs=nnx.Rngs(0), impl="xla")
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 10, 16)), jnp.float32)
    np.testing.assert_allclose(np.asarray(layer_xla(x)), np.asarray(layer_auto(x)), rtol=1e-5,
                               atol=1e-6)
    base = preset("cpu-1e12")
    forced = base.with_overrides({"attention": "xla"})
    assert "attention" not in base.to_json() and forced.hash() != base.hash()
    assert ModelConfig.from_dict(forced.to_dict()) == forced
    assert forced.param_counts() == base.param_counts()
    with pytest.raises(ValueError, match="attention"):
        base.with_overrides({"attention": "flash"})


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU with cuDNN")
@pytest.mark.parametrize("shape", [(2, 512, 8, 64), (1, 1024, 12, 64), (4, 128, 4, 32)])
def test_cudnn_equals_xla_on_the_gpu(shape):
    if not attn_lib.cudnn_supported(jnp.bfloat16, shape[-1]):
        pytest.skip("cuDNN fused attention does not take this device")
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, ct = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)

    def f(impl):
        return jax.jit(jax.value_and_grad(
            lambda q, k, v: jnp.sum(causal_attention(q, k, v, impl).astype(jnp.float32) * ct),
            argnums=(0, 1, 2)))

    (a, ga), (b, gb) = f("cudnn")(q, k, v), f("xla")(q, k, v)
    out_c, out_x = causal_attention(q, k, v, "cudnn"), causal_attention(q, k, v, "xla")
    np.testing.assert_allclose(np.asarray(out_c, np.float32), np.asarray(out_x, np.float32),
                               atol=2e-2, rtol=2e-2)
    for x, y in zip(ga, gb):
        scale = float(jnp.max(jnp.abs(y.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(x, np.float32) / scale, np.asarray(y, np.float32) / scale,
                                   atol=3e-2)
