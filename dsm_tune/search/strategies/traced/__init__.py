"""The traced search (shape + budget): see `proposer.py`."""

from dsm_tune.search.strategies.traced.proposer import TracedProposer
from dsm_tune.search.strategies.traced.shapes import BUDGET_PARAM, SHAPE_PARAMS, TOME_SHAPE, Shape, compile_schedule
from dsm_tune.search.strategies.traced.space import TracedSpace

__all__ = ["BUDGET_PARAM", "SHAPE_PARAMS", "TOME_SHAPE", "Shape", "TracedProposer", "TracedSpace", "compile_schedule"]
