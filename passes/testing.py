"""The pass test harness lives in mla_graph.testing; this name keeps existing imports working."""
from mla_graph.testing import TOLERANCES, PassCheck, check_pass, snapshot, trace

__all__ = ["PassCheck", "TOLERANCES", "check_pass", "snapshot", "trace"]
