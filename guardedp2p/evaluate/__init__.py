"""Four-axis evaluation of the GuardedTuning designs: utility, privacy, IP exposure and cost, from the same runs.

``guardedp2p evaluate`` (:mod:`guardedp2p.cli.evaluate`) runs the privacy-utility frontier,
:func:`~guardedp2p.evaluate.frontier.run_frontier` (CIs over items and seeds, an adaptive attacker, a sanity
gate); :func:`~guardedp2p.evaluate.grid.run_grid` is the earlier single-seed grid, kept as a Python API.
"""

from guardedp2p.evaluate.frontier import HEADLINE_ROWS, SWEEP_ROWS, FrontierConfig, run_frontier
from guardedp2p.evaluate.grid import DEFAULT_ROWS, ROWS, GridConfig, run_grid, summary_table

__all__ = [
    "DEFAULT_ROWS",
    "HEADLINE_ROWS",
    "SWEEP_ROWS",
    "ROWS",
    "FrontierConfig",
    "GridConfig",
    "run_frontier",
    "run_grid",
    "summary_table",
]
