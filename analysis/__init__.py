"""Analysis of sparsity-allocation and memory-scaling sweeps (pandas, scipy, matplotlib only).

Reads the tidy tables the sweep runner writes (``results/<grid>/runs.csv`` plus per-trial
``curves/<trial_id>.csv``), fits the paper's two headline shapes and draws paper-style figures:

* sparsity allocation (docs/paper.md section 2): validation loss against rho, the share of the
  sparse parameters kept in routed experts, is U-shaped with its optimum near rho 0.75-0.8.
  :func:`analysis.fit.fit_u_curve` tests for a U against every monotone curve, fits the whole
  curve with candidate shapes (symmetric and two-sided forms, polynomials) chosen by AIC, and
  reports the optimum with a seed-level bootstrap interval, or says plainly why there is no U.
* memory scaling (docs/paper.md section 3): at a fixed backbone, loss falls as a power law in
  Engram table size.
  :func:`analysis.fit.fit_power_law` fits ``L = E + A x^-alpha`` with a Huber loss on log L.

Modules: ``load`` (tables in), ``fit`` (pure fitters), ``style`` + ``plots`` (figures),
``synthetic`` (fake grids in the runner's layout and curve families, for tests, demos and
``calibrate``), ``ushape`` (the shape test and candidate shapes), ``__main__`` (the CLI:
``python -m analysis fit|plots``). This package never imports JAX or Ray.
"""
