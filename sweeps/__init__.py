"""Ray Tune orchestration of sweep grids: grid files (``grids/*.yaml``), the typed loader
(``grid.py``) and the runner (``python -m sweeps.run GRID.yaml``, ``make sweep``).

This is the only package that imports Ray; ``grid.py`` does not, so grids can be validated
without it.
"""
