"""Sweeps: a grid or list of recipe variants trained over one activation store (the paper's ablations).

`grid` expands the command line (and holds the fixed QK parameter budget), `plan` turns it into recipes,
`runner` trains them resumably over the processes of a launch, `summary` and `plots` report them.
"""

from .grid import Axis, expand, parse_arguments, qk_parameters, with_qk_budget
from .plan import Configuration, SweepPlan, make_plan
from .runner import run_sweep

__all__ = ["Axis", "Configuration", "SweepPlan", "expand", "make_plan", "parse_arguments", "qk_parameters",
           "run_sweep", "with_qk_budget"]
