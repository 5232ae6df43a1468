"""The shape of a trial's device mesh, and the checks a mesh must pass before any work.

Pure Python (no JAX): ``config.TrainConfig`` holds a ``MeshShape`` and the sweep driver checks
grids with it without starting JAX. The axes, in mesh order:

- ``data``: data parallelism. Every device of the axis holds the whole model and optimizer state
  and a slice of the batch; gradients are summed over the axis.
- ``fsdp``: fully sharded data parallelism. A slice of the batch, and of every matrix (split along
  its model-width axis, ``d_model``) and its optimizer moments; each layer's weights are gathered
  for the step and its gradients reduced back to their owners.
- ``expert``: expert parallelism. The routed experts are split over the axis (``n_routed`` /
  ``expert`` per device) and the tokens go to the devices of their experts; for everything else
  the axis is a data axis (a slice of the batch, the rest of the model replicated).

The batch is split over all three axes, and the Engram (and OverEncoding) tables' rows over every
device of the mesh (``engram_jax.parallel.rules``). ``MeshShape()`` is one device: the program of
a trial without a mesh.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

AXES = ("data", "fsdp", "expert")


@dataclass(frozen=True, slots=True)
class MeshShape:
    """Devices along each mesh axis (``AXES`` order); the mesh uses data * fsdp * expert devices."""

    data: int = 1
    fsdp: int = 1
    expert: int = 1

    def __post_init__(self):
        for ax in AXES:
            v = getattr(self, ax)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"mesh axis {ax} must be an integer >= 1, got {v!r}")

    @classmethod
    def parse(cls, value) -> MeshShape:
        """A mesh from ``None`` (one device), a ``MeshShape``, a mapping ``{data: 2, fsdp: 2}``
        (axes left out are 1), the string ``"data=2,fsdp=2,expert=2"`` or a sequence of three
        sizes in ``AXES`` order. Raises ValueError naming what is wrong."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            text = value.strip()
            if text in ("", "1", "none", "single"):
                return cls()
            sizes = {}
            for part in text.split(","):
                m = re.fullmatch(r"\s*([a-z_]+)\s*=\s*(\d+)\s*", part)
                if m is None:
                    raise ValueError(f"mesh {value!r}: expected axis=size pairs such as "
                                     f"data=2,fsdp=2,expert=2 (axes: {', '.join(AXES)})")
                if m.group(1) in sizes:
                    raise ValueError(f"mesh {value!r}: axis {m.group(1)} given twice")
                sizes[m.group(1)] = int(m.group(2))
            return cls.parse(sizes)
        if isinstance(value, Mapping):
            bad = sorted(set(value) - set(AXES))
            if bad:
                raise ValueError(f"mesh: unknown axis {bad[0]!r}; the axes are {', '.join(AXES)}")
            return cls(**{k: value[k] for k in AXES if k in value})
        if isinstance(value, (list, tuple)) and len(value) == len(AXES):
            return cls(*value)
        raise ValueError(f"mesh must be a mapping {{data: N, fsdp: N, expert: N}}, a string "
                         f"'data=N,fsdp=N,expert=N' or None, got {value!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.expert)

    @property
    def size(self) -> int:
        """Devices the mesh uses."""
        return math.prod(self.shape)

    @property
    def batch_ways(self) -> int:
        """Slices the batch is split into: every axis."""
        return self.size

    def __str__(self) -> str:
        return ",".join(f"{ax}={getattr(self, ax)}" for ax in AXES)


def check_mesh(mesh: MeshShape, cfg, tcfg=None, *, devices: int | None = None) -> None:
    """Raise ValueError (one message naming every problem) when ``mesh`` cannot run ``cfg``
    (a ``ModelConfig``) with ``tcfg`` (a ``TrainConfig``) on ``devices`` devices.

    A mesh of one device always fits. Otherwise: data * fsdp * expert must equal the devices JAX
    sees (``devices``; unchecked when None), ``expert`` must divide the routed experts of every MoE
    layer, ``fsdp`` must divide ``d_model`` (the axis FSDP splits), the batch (and each of
    ``grad_accum`` micro-batches) must split evenly over the mesh, and offloaded Engram tables
    (host memory, one process) are refused."""
    problems = []
    if devices is not None and mesh.size != 1 and mesh.size != devices:
        hint = ""
        if devices < mesh.size:
            hint = (f"; on the CPU, set XLA_FLAGS=--xla_force_host_platform_device_count="
                    f"{mesh.size} before JAX starts")
        problems.append(f"the mesh {mesh} uses {mesh.size} devices but JAX sees {devices}{hint}")
    if mesh.expert > 1:
        if cfg.moe is None:
            problems.append(f"expert={mesh.expert} but the model has no routed experts")
        elif cfg.moe.n_routed % mesh.expert:
            problems.append(f"expert={mesh.expert} does not divide the {cfg.moe.n_routed} routed "
                            "experts")
    if cfg.d_model % mesh.fsdp:
        problems.append(f"fsdp={mesh.fsdp} does not divide d_model={cfg.d_model} (FSDP splits "
                        "every matrix along its model width)")
    if mesh.size > 1 and cfg.engram is not None and cfg.engram.offload:
        problems.append("offloaded Engram tables (engram.offload) live in one process's host "
                        "memory: use a one-device mesh, or keep the tables on the devices (sharded "
                        "by rows)")
    if tcfg is not None:
        accum = getattr(tcfg, "grad_accum", 1)
        if tcfg.batch_size % (accum * mesh.batch_ways):
            what = f"grad_accum={accum} micro-batches of " if accum > 1 else ""
            problems.append(f"batch_size={tcfg.batch_size} does not split into {what}"
                            f"{mesh.batch_ways} equal slices (data*fsdp*expert = "
                            f"{mesh.batch_ways}: the batch is split over every mesh axis)")
    if problems:
        raise ValueError("bad mesh: " + "; ".join(problems))
