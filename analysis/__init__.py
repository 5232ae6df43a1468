"""Analysis of sparsity-allocation and memory-scaling sweeps (pandas, scipy, matplotlib only).

Reads the tidy tables the sweep runner writes (``results/<grid>/runs.csv`` plus per-trial
``curves/<trial_id>.csv``), fits the paper's two headline shapes and draws paper-style figures:

* sparsity allocation (engram-paper.md section 2): validation loss against rho, the share of the
  sparse parameters kept in routed experts, is U-shaped with its optimum near rho 0.75-0.8.
  :func:`analysis.fit.fit_u_curve` fits a vertex-form parabola around the minimum and reports the
  optimum with profile-likelihood and bootstrap intervals, or says plainly why there is no U.
* memory scaling (section 3): at a fixed backbone, loss falls as a power law in Engram table size.
  :func:`analysis.fit.fit_power_law` fits ``L = E + A x^-alpha`` with a Huber loss on log L.

Modules: ``load`` (tables in), ``fit`` (pure fitters), ``style`` + ``plots`` (figures),
``synthetic`` (fake grids in the runner's layout, for tests and demos), ``__main__`` (the CLI:
``python -m analysis fit|plots``). This package never imports JAX or Ray.
"""
