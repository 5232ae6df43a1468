"""Gradient accumulation: one optimizer step from the gradients of several micro-batches.

``TrainConfig.grad_accum = n`` splits each batch [B, ...] into n micro-batches of B / n sequences
(micro-batch i holds sequences i, i + n, i + 2n, ...: on a mesh every device keeps the rows it
already holds), runs the forward and backward pass on each in turn inside a ``jax.lax.scan`` (one
micro-batch's activations alive at a time) and sums their gradients. Every micro-batch holds the
same number of tokens, so the mean of their mean losses is the batch's mean loss and the summed
gradients divided by n are the batch's gradient, up to float rounding.

What is not a sum over sequences differs: the MoE capacity buffers are sized and filled per
micro-batch, and the auxiliary balance loss (``moe.balance = "aux"``) is computed per micro-batch
and averaged. The routing load (tokens per expert, which drives the routing-bias update) is
summed, as the whole batch would count it; dropless MoE and dense models give the whole batch's
step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split(batch, n: int):
    """Every leaf [B, ...] of ``batch`` as [n, B / n, ...], micro-batch i = rows i, i + n, ..."""
    def one(x):
        if x.shape[0] % n:
            raise ValueError(f"a batch of {x.shape[0]} does not split into {n} micro-batches")
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    return jax.tree.map(one, batch)


def value_and_grad(loss_fn, n: int):
    """``jax.value_and_grad(loss_fn, has_aux=True)`` for ``loss_fn(params, rest, batch) ->
    (loss, (ce, aux))``, accumulated over ``n`` micro-batches of ``batch`` (n = 1: the plain
    gradient, nothing added). ``aux["load"]`` is summed over the micro-batches, every other
    value averaged."""
    vg = jax.value_and_grad(loss_fn, has_aux=True)
    if n == 1:
        return vg

    def accumulated(params, rest, batch):
        micro = split(batch, n)
        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(vg, params, rest, first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(acc, mb):
            out = vg(params, rest, mb)
            return jax.tree.map(jnp.add, acc, out), None

        ((loss, (ce, aux)), grads), _ = jax.lax.scan(body, zeros, micro)
        mean = lambda t: jax.tree.map(lambda x: x / n, t)  # noqa: E731
        aux = {k: (v if k == "load" else mean(v)) for k, v in aux.items()}
        return (loss / n, (ce / n, aux)), mean(grads)

    return accumulated
