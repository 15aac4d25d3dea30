"""Plugin start-up: check the vLLM version, register the op, make MLAGraphAttention the
out-of-tree class of vLLM's pluggable MLA layer, and keep it so whatever else registers one.

vLLM resolves a pluggable layer at construction (`PluggableLayer.__new__` reads
`op_registry_oot[class name]`), and `register_oot` (PluggableLayer's or CustomOp's, one shared dict)
asserts the name is new: of two plugins replacing the same layer, the first registered wins and
the second crashes, so the winner would depend on plugin load order. vllm-ascend registers its
`AscendMultiHeadLatentAttention` under the same name. With MLA_GRAPH_VLLM=1 ours wins either way:
an earlier registration is replaced, and a later one through `register_oot` is let through
without taking the name (both logged).
"""
from __future__ import annotations

import functools
import inspect
import logging

from vllm.model_executor.custom_op import CustomOp, PluggableLayer, op_registry_oot
from vllm.model_executor.layers.mla import MultiHeadLatentAttentionWrapper
from vllm.platforms import current_platform

from .layer import MLAGraphAttention
from .op import list_as_attention_op, register_op
from .versions import vllm_support

logger = logging.getLogger("mla_graph.vllm")
REPLACED = MultiHeadLatentAttentionWrapper.__name__  # PluggableLayer looks OOT classes up by class name


def install() -> None:
    """Idempotent: vLLM may load general plugins more than once per process."""
    log_with_vllm()
    support = vllm_support()
    register_op(current_platform.dispatch_key)
    list_as_attention_op()
    for registry in (PluggableLayer, CustomOp):
        _keep_ours_on_register_oot(registry)
    current = op_registry_oot.get(REPLACED)
    if current is MLAGraphAttention:
        return
    if current is not None:
        logger.warning("mla-graph: %s.%s was registered as the out-of-tree %s; MLA_GRAPH_VLLM=1 replaces it "
                       "with mla-graph's", current.__module__, current.__qualname__, REPLACED)
    MLAGraphAttention.name = REPLACED   # what register_oot sets
    op_registry_oot[REPLACED] = MLAGraphAttention
    logger.info("mla-graph: replaced vLLM's pluggable layer 'multi_head_latent_attention' (%s.%s) with "
                "%s.%s (vLLM %s); DeepSeek MLA layers (projections, norms, rope, cache write, attention, "
                "o_proj) run through the lowered mla-graph module",
                MultiHeadLatentAttentionWrapper.__module__, REPLACED,
                MLAGraphAttention.__module__, MLAGraphAttention.__qualname__, support.series)


def log_with_vllm() -> None:
    """The plugin's log lines go where vLLM's go. vLLM's logger ("vllm") has its own handler and
    does not propagate; ours ("mla_graph.vllm") would reach only the root logger, which a vLLM
    process leaves without handlers, so nothing would show. Where the application (or pytest)
    set handlers up, they are left alone. vLLM may configure its handler after plugins load
    (0.32 does), so records are handed to the "vllm" logger's handlers when they are logged, or
    to stderr while it has none."""
    if logger.hasHandlers():
        return
    logger.addHandler(_ToVllmHandlers())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


class _ToVllmHandlers(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.until_vllm_logs = logging.StreamHandler()   # stderr
        self.until_vllm_logs.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        vllm_logger = logging.getLogger("vllm")
        if not vllm_logger.handlers:
            self.until_vllm_logs.handle(record)
        elif vllm_logger.isEnabledFor(record.levelno):
            vllm_logger.callHandlers(record)


def _keep_ours_on_register_oot(registry: type) -> None:
    """Wrap registry.register_oot: a registration of REPLACED while ours holds it keeps ours."""
    original = registry.__dict__["register_oot"].__func__
    if getattr(original, "mla_graph_keeps_ours", False):
        return
    signature = inspect.signature(original)   # (cls, _decorated_layer_cls / _decorated_op_cls=None, name=None)
    decorated_arg = list(signature.parameters)[1]

    @functools.wraps(original)
    def register_oot(cls, *args, **kwargs):
        bound = signature.bind(cls, *args, **kwargs)
        bound.apply_defaults()
        decorated, name = bound.arguments[decorated_arg], bound.arguments["name"]
        registers = name if name is not None else cls.__name__
        if registers != REPLACED or op_registry_oot.get(REPLACED) is not MLAGraphAttention:
            return original(cls, *args, **kwargs)

        def keep_ours(other: type) -> type:
            logger.warning("mla-graph: %s.%s registers as the out-of-tree %s too; mla-graph's %s stays "
                           "(MLA_GRAPH_VLLM=1)", other.__module__, other.__qualname__, REPLACED,
                           MLAGraphAttention.__qualname__)
            return other
        return keep_ours(decorated) if decorated is not None else keep_ours

    register_oot.mla_graph_keeps_ours = True
    registry.register_oot = classmethod(register_oot)
