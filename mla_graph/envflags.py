"""On/off switches read from the environment (MLA_GRAPH_CHECKED, MLA_GRAPH_VLLM, ...)."""
from __future__ import annotations

import os

TRUE = ("1", "true", "yes", "on")
FALSE = ("", "0", "false", "no", "off")


def env_flag(name: str) -> bool:
    """$name as a switch: unset or one of FALSE is off, one of TRUE is on; anything else is an
    error naming the variable, its value and the accepted ones."""
    value = os.environ.get(name, "").strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ValueError(f"{name}={os.environ[name]!r}; expected one of {TRUE + FALSE[1:]}")
