import os
import tempfile

# Tests run on the CPU with deterministic, single-threaded-friendly settings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
# The trials' glibc malloc settings (engram_jax.host_malloc), before JAX starts its threads: XLA's
# per-step buffer is then reused instead of mapped and faulted in afresh by every call.
from engram_jax import host_malloc  # noqa: E402

host_malloc.apply_in_process()
# Trials and the training CLI keep JAX's compilation cache here, not in the user's ~/.cache.
os.environ.setdefault("ENGRAM_JAX_COMPILE_CACHE",
                      os.path.join(tempfile.gettempdir(), f"engram-jax-tests-xla-{os.getuid()}"))
