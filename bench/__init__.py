"""Performance harness for the GPU sweep presets (``make bench``; ``python -m bench.run --help``).

Files: ``common.py`` (timing, peaks, CSV rows), ``parts.py`` (the measurements of one preset:
train step, attention, MoE vs dense FFN, Engram gather/scatter vs ceilings, input pipeline),
``offload.py`` (host-offloaded Engram tables vs device-resident ones), ``grid.py`` (whole CPU
grids end to end), ``breakdown.py`` (a CPU step's sublayers compiled alone), ``profile.py`` (a
CPU step's time per model part from XLA's trace), ``cli.py`` (their shared arguments), ``run.py``
(sizes, CLI), ``gpucheck.py`` (the accelerator check: the GPU budgets' train step with each
option on and off, MFU against the measured and the rated peak), ``droprate.py`` (committed
trials retrained to read their capacity drop rate).
Method, as in docs/design.md section 9 (Planning figures): count FLOPs and bytes first, warm up,
``jax.block_until_ready``, medians of repeats, inputs passed as jit arguments, never timed on
all-zero inputs.
"""
