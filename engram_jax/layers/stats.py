"""Statistics a layer records while a training or evaluation step traces the model.

A step that wants them runs the model through ``collect``; a layer calls ``record`` with a scalar
it computed anyway (the Engram gate's mean), which is sown into the module as an
``nnx.Intermediate`` and returned by ``nnx.capture`` beside the model's output (lifted transforms
such as ``nnx.remat`` carry it out). Outside ``collect`` ``record`` does nothing, so a model
called any other way computes and holds exactly what it did before.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from flax import nnx

_COLLECTING = contextvars.ContextVar("engram_jax_collect_stats", default=False)


@contextlib.contextmanager
def _collecting():
    token = _COLLECTING.set(True)
    try:
        yield
    finally:
        _COLLECTING.reset(token)


def record(module: nnx.Module, name: str, value: jax.Array) -> None:
    """Sow ``value`` into ``module`` under ``name`` inside ``collect``; else nothing."""
    if _COLLECTING.get():
        module.sow(nnx.Intermediate, name, value)


def collect(fn, model: nnx.Module, *args, **kwargs):
    """``fn(model, *args, **kwargs)`` with the layers' records: ``(result, {name: {decoder
    layer index: value}})`` (the value recorded last where a layer recorded several times)."""
    with _collecting():
        result, inter = nnx.capture(fn, nnx.Intermediate)(model, *args, **kwargs)
    out: dict[str, dict[int, jax.Array]] = {}
    for path, var in nnx.to_flat_state(inter):
        names = [p for p in path if isinstance(p, str)]
        name = names[-1] if names else "?"
        layer = next((int(p) for p in path if isinstance(p, int)), -1)
        value = var.get_value() if hasattr(var, "get_value") else var.value
        out.setdefault(name, {})[layer] = value[-1] if isinstance(value, tuple) else value
    return result, {k: dict(sorted(v.items())) for k, v in out.items()}
