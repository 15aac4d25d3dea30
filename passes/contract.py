"""The graph contract lives in mla_graph.contract; this name keeps existing imports working."""
from mla_graph.contract import (BLOCK_TABLE, HIDDEN_STATES, INPUTS, LATENT_CACHE, PARTS, POSITIONS,  # noqa: F401
                                QUERY_START_LOC, ROPE_CACHE, SEQ_LENS, SLOT_MAPPING, GraphInput, GraphMeta,
                                find_input, graph_meta, input_of, maybe_meta)
