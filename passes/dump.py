"""Graph dumps are rendered by mla_graph.dumptool.render; this name keeps existing imports working."""
from mla_graph.dumptool.render import *  # noqa: F401,F403
from mla_graph.dumptool.render import __all__  # noqa: F401
