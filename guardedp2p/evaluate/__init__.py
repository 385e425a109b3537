"""Four-axis evaluation of the GuardedTuning designs: utility, privacy, IP exposure and cost, from the same runs.

``guardedp2p evaluate`` (:mod:`guardedp2p.cli.evaluate`) is the command; :func:`run_grid` the Python entry point.
"""

from guardedp2p.evaluate.grid import DEFAULT_ROWS, ROWS, GridConfig, run_grid, summary_table

__all__ = ["DEFAULT_ROWS", "ROWS", "GridConfig", "run_grid", "summary_table"]
