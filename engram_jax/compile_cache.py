"""JAX's persistent compilation cache, shared by the trials that run on one machine.

A trial compiles its train and evaluation steps and, while building the model, a few dozen small
eager programs (initialisers, splits). On the 2-core CPU that is several seconds per trial, paid
again by every seed and every rerun of the same shapes. With the cache on, a program compiled
once on this machine is read back from disk: a quarter-length two-trial ``cpu-1e12`` grid ran in
39 s with a warm cache and 49 s with an empty one (``results/bench/README.md``).
The executables are the ones XLA produced, so the numbers a trial computes are unchanged.

The cache is keyed by JAX on the program, the compiler options, the backend and the JAX version,
so a directory may be shared by every grid and by every JAX version installed on a machine. Its default is
``$ENGRAM_JAX_COMPILE_CACHE`` or else ``$XDG_CACHE_HOME/engram-jax/xla`` (``~/.cache/...``),
resolved on the machine that runs the trial (a cluster's workers each keep their own).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OFF = "off"
DEFAULT = "default"


def default_dir() -> Path:
    env = os.environ.get("ENGRAM_JAX_COMPILE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "engram-jax" / "xla"


def resolve(setting: str | None) -> Path | None:
    """The cache directory for a ``--compile-cache`` setting: None or "default" -> ``default_dir()``,
    "off" -> None (no cache), anything else -> that path."""
    if setting is None or setting == DEFAULT:
        return default_dir()
    if setting == OFF:
        return None
    return Path(setting).expanduser()


def check(setting: str | None) -> None:
    """Raise ValueError if an explicit directory (not "default" or "off") cannot hold the cache;
    called before any work starts. Creates the directory if it is missing."""
    if setting in (None, DEFAULT, OFF):
        return
    p = Path(setting).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"--compile-cache {setting}: not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--compile-cache {setting}: cannot create it ({e})") from None
    if not os.access(p, os.W_OK):
        raise ValueError(f"--compile-cache {setting}: not writable")


def enable(setting: str | None) -> Path | None:
    """Turn the persistent cache on in this process (before its first compilation) and return its
    directory, or None for "off" or when the directory cannot be created (a warning; the trial
    then compiles as usual)."""
    path = resolve(setting)
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"warning: no compilation cache ({path}: {e})", file=sys.stderr, flush=True)
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    # Every program, however quick to compile: a trial's set-up is many small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
