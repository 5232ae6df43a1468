"""One trial over several JAX processes (hosts): JAX's distributed runtime.

Every process runs the same trial: it builds the same global batches on its host, copies to its
own devices the slices they hold (``Parallel.put_batch``) and computes its part of every step;
the mesh spans the devices of all processes. Process 0 writes the run's files (config, metrics,
record); every process writes its own shards of each checkpoint, so the output directory must be
one that every process sees (a shared filesystem). Started either by hand (``python -m
engram_jax.train --coordinator HOST:PORT --processes N --process-id I`` on each host) or by Ray
Train's ``JaxTrainer`` inside a Tune trial (``sweeps.trainable``), which starts it itself on GPUs
and TPUs; CPU workers are started here.
"""

from __future__ import annotations


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """``jax.distributed.initialize``, before JAX starts a backend. Raises ValueError when the
    three settings are not all given or do not make sense."""
    if coordinator is None or num_processes is None or process_id is None:
        raise ValueError("a trial over several processes needs --coordinator HOST:PORT, "
                         "--processes N and --process-id I together")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, --processes={num_processes}), got "
                         f"{process_id}")
    if ":" not in coordinator:
        raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    import jax

    jax.distributed.initialize(coordinator, num_processes, process_id)


def free_port() -> int:
    """A TCP port free on this host now (for a coordinator started here)."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
