import os
import tempfile

# Tests run on the CPU with deterministic, single-threaded-friendly settings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
# Trials and the training CLI keep JAX's compilation cache here, not in the user's ~/.cache.
# One directory per pytest-xdist worker: two processes never write one cache entry at once.
os.environ.setdefault("ENGRAM_JAX_COMPILE_CACHE", os.path.join(
    tempfile.gettempdir(),
    f"engram-jax-tests-xla-{os.getuid()}-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"))
