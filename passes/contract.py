"""The graph contract lives in mla_graph.contract; this name keeps existing imports working."""
from mla_graph.contract import *  # noqa: F401,F403
from mla_graph.contract import __all__  # noqa: F401
