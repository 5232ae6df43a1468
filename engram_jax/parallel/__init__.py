"""Scaling one trial out: the device mesh (``mesh``), the rules that split each parameter over
it (``rules``) and the shardings of the train state and batches (``sharding``, which imports
JAX; the other two do not). docs/design.md section 8 (Scaling one trial out)."""

from engram_jax.parallel.mesh import AXES, MeshShape, check_mesh

__all__ = ["AXES", "MeshShape", "check_mesh"]
