"""The pass test harness lives in mla_graph.testing; this name keeps existing imports working."""
from mla_graph.testing import *  # noqa: F401,F403
from mla_graph.testing import __all__  # noqa: F401
