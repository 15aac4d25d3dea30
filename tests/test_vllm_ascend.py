"""The vLLM plugin against vllm-ascend's own code (0.30.0rc2, beside vLLM 0.30.0 and torch 2.10.0).

vllm-ascend's Python package runs here with its native modules stubbed (tests/cann_stubs.py) and
its egg-info on sys.path, so vLLM activates its platform plugin ("ascend": NPUPlatform) and loads
its general plugins next to ours, as on an Ascend host. Each check runs in a fresh interpreter:
the platform and the registries are per process.

Checked against vllm-ascend's code: which MLA layer wins when its NPU worker registers its own
(in the order a worker does it, and the other order), the target chosen on its platform, which
additional_config its config validation accepts, and the options of its that the plugin refuses.

Runs in `make test`'s torch 2.10 environment (vllm-ascend 0.30.0rc2 pins torch 2.10.0); beside
another torch it skips and says so.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_ascend_source import RELEASE, vllm_ascend_source

if not torch.__version__.startswith("2.10."):
    pytest.skip(f"vllm-ascend {RELEASE} runs beside torch 2.10.0, this is torch {torch.__version__}; these "
                f"tests run in make test's torch 2.10 environment (.venv-torch2.10)", allow_module_level=True)
if os.environ.get("MLA_GRAPH_NO_VLLM") == "1":
    pytest.skip("MLA_GRAPH_NO_VLLM=1: vLLM plugin tests not run", allow_module_level=True)

TESTS = pathlib.Path(__file__).parent
NAME = "MultiHeadLatentAttentionWrapper"


def _run(script: str, **env: str) -> subprocess.CompletedProcess:
    """`script` in a fresh interpreter beside vllm-ascend's code, its native modules stubbed."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLA_GRAPH_VLLM", "VLLM_TARGET_DEVICE", "VLLM_PLUGINS"))}
    environ.update(env, PYTHONPATH=os.pathsep.join([str(vllm_ascend_source()), str(TESTS)]))
    prologue = "import cann_stubs  # noqa\nimport logging, json\n" \
               "logging.basicConfig(level=logging.INFO, format='%(name)s %(message)s')\n"
    run = subprocess.run([sys.executable, "-c", prologue + textwrap.dedent(script)], env=environ,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-5000:]}"
    return run


def _lines(run: subprocess.CompletedProcess, tag: str) -> list:
    return [json.loads(line[len(tag) + 1:]) for line in run.stdout.splitlines() if line.startswith(tag + " ")]


# ends the registration scripts (indented as they are)
REGISTRY = """
        from vllm.model_executor.custom_op import op_registry_oot
        from vllm.platforms import current_platform
        from mla_graph.vllm_plugin.targets import choose_targets
        cls = op_registry_oot.get("MultiHeadLatentAttentionWrapper")
        print("RESULT", json.dumps({
            "platform": f"{type(current_platform).__module__}.{type(current_platform).__qualname__}",
            "device_type": current_platform.device_type,
            "mla": cls and f"{cls.__module__}.{cls.__qualname__}",
            "others": sorted(k for k, v in op_registry_oot.items() if v.__module__.startswith("vllm_ascend.")),
            "targets": choose_targets(None, current_platform.device_type)}))
"""


def test_plugin_keeps_mla_when_vllm_ascend_registers_its_layers_as_its_worker_does():
    """A vLLM process beside vllm-ascend: general plugins load (vllm-ascend's and ours, from their
    entry points), then vllm-ascend's NPUWorker registers its custom ops, its MLA layer under the
    name ours holds. Ours stays, vllm-ascend's other layers register as before, and the decode of
    every phase defaults to the npu target on its platform."""
    run = _run("""
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from vllm_ascend.utils import register_ascend_customop
        register_ascend_customop()     # NPUWorker.__init__, after the general plugins
    """ + REGISTRY, MLA_GRAPH_VLLM="1")
    [result] = _lines(run, "RESULT")
    assert result["platform"] == "vllm_ascend.platform.NPUPlatform" and result["device_type"] == "npu"
    assert result["mla"] == "mla_graph.vllm_plugin.layer.MLAGraphAttention"
    assert {"RMSNorm", "RowParallelLinear", "RotaryEmbedding", "KimiK3MultiHeadLatentAttentionWrapper"} \
        <= set(result["others"]) and NAME not in result["others"]
    assert result["targets"] == {"prefill": "npu", "mixed": "npu", "decode": "npu"}
    assert (f"vllm_ascend.ops.mla.AscendMultiHeadLatentAttention registers as the out-of-tree {NAME} too; "
            f"mla-graph's MLAGraphAttention stays (MLA_GRAPH_VLLM=1)") in run.stderr


def test_plugin_replaces_vllm_ascends_mla_registered_before_it():
    run = _run("""
        from vllm_ascend.utils import register_ascend_customop
        register_ascend_customop()
        from mla_graph.vllm_plugin import register
        assert register() is True
    """ + REGISTRY, MLA_GRAPH_VLLM="1", MLA_GRAPH_VLLM_DECODE_TARGET="torchair")
    [result] = _lines(run, "RESULT")
    assert result["mla"] == "mla_graph.vllm_plugin.layer.MLAGraphAttention"
    assert result["targets"] == {"prefill": "npu", "mixed": "npu", "decode": "torchair"}
    assert (f"vllm_ascend.ops.mla.AscendMultiHeadLatentAttention was registered as the out-of-tree {NAME}; "
            f"MLA_GRAPH_VLLM=1 replaces it with mla-graph's") in run.stderr


def test_without_the_switch_vllm_ascends_mla_is_left_alone():
    run = _run("""
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from vllm_ascend.utils import register_ascend_customop
        register_ascend_customop()
    """ + REGISTRY)
    [result] = _lines(run, "RESULT")
    assert result["mla"] == "vllm_ascend.ops.mla.AscendMultiHeadLatentAttention"
    assert "mla-graph" not in run.stderr


# starts the configuration scripts: a VllmConfig stand-in with the fields init_ascend_config reads
VLLM_CONFIG = """
        from unittest import mock

        def vllm_config(extra, consumer):   # the fields init_ascend_config reads
            config = mock.MagicMock()
            config.additional_config = extra
            config.kv_transfer_config = mock.MagicMock(is_kv_consumer=True) if consumer else None
            parallel = config.parallel_config
            parallel.prefill_context_parallel_size = parallel.decode_context_parallel_size = 1
            parallel.pipeline_parallel_size = parallel.tensor_parallel_size = parallel.data_parallel_size = 1
            parallel.enable_expert_parallel = False
            config.scheduler_config.max_num_batched_tokens = 8192
            config.quant_config = config.speculative_config = None
            config.model_config.enforce_eager = config.model_config.is_moe = False
            config.model_config.is_deepseek_mla = True
            config.model_config.hf_config = mock.MagicMock(spec=[])   # no index_topk: not sparse
            config.cache_config.block_size = 128
            return config
"""

# additional_config cases: (name, additional_config, kv consumer node)
CASES = [
    ("default", {}, False),
    ("mla_graph key", {"mla_graph": {"target": "npu"}}, False),
    ("torchair graph mode", {"torchair_graph_config": {"enabled": True, "graph_batch_sizes": [4, 8]}}, False),
    ("xlite", {"xlite_graph_config": {"enabled": True}}, False),
    ("kv nz", {"enable_kv_nz": True}, True),
    ("mlapo off, nd weights", {"enable_mlapo": False, "weight_nz_mode": 0}, False),
]


@pytest.fixture(scope="module")
def option_results():
    """For each case: what vllm-ascend's init_ascend_config says, then the plugin's checks over the
    AscendConfig it built (refuse_conflicting_options reads it from vllm-ascend, as the layer does)."""
    run = _run(VLLM_CONFIG + """
        from vllm_ascend.ascend_config import clear_ascend_config, init_ascend_config
        from mla_graph.vllm_plugin.ascend import refuse_conflicting_options
        from mla_graph.vllm_plugin.targets import choose_targets

        def outcome(call):
            try:
                return {"ok": call()}
            except Exception as error:
                return {"error": f"{type(error).__name__}: {error}"}

        for name, extra, consumer in CASES:
            clear_ascend_config()
            config = vllm_config(dict(extra), consumer)
            result = {"name": name, "vllm_ascend": outcome(lambda: init_ascend_config(config) is not None)}
            if "ok" in result["vllm_ascend"]:
                result["plugin"] = outcome(lambda: refuse_conflicting_options() is None)
            result["targets"] = outcome(lambda: choose_targets(extra, "npu"))
            print("CASE", json.dumps(result))
    """.replace("CASES", repr(CASES)))
    return {case["name"]: case for case in _lines(run, "CASE")}


def test_vllm_ascends_config_accepts_the_plugins_defaults_and_refuses_its_key(option_results):
    default = option_results["default"]
    assert default["vllm_ascend"] == {"ok": True} and default["plugin"] == {"ok": True}
    assert default["targets"] == {"ok": {"prefill": "npu", "mixed": "npu", "decode": "npu"}}
    # vllm-ascend 0.30 refuses keys it does not know: the plugin is configured by environment there
    # (docs/vllm.md), though additional_config["mla_graph"] is still read beside other platforms
    refused = option_results["mla_graph key"]["vllm_ascend"]["error"]
    assert "mla_graph" in refused, refused
    # vllm-ascend's options of its own MLA kernels do not concern ours
    other = option_results["mlapo off, nd weights"]
    assert other["vllm_ascend"] == {"ok": True} and other["plugin"] == {"ok": True}


def test_removed_torchair_graph_mode_is_refused_by_both(option_results):
    case = option_results["torchair graph mode"]
    assert "torchair_graph_config" in case["vllm_ascend"]["error"], case
    assert case["targets"]["error"].startswith(
        "ValueError: additional_config['torchair_graph_config'] ({'enabled': True, 'graph_batch_sizes': [4, 8]}) "
        "is vllm-ascend's torchair graph mode, removed in vllm-ascend v0.12.0rc1")
    assert "set MLA_GRAPH_VLLM_DECODE_TARGET=torchair" in case["targets"]["error"]


@pytest.mark.parametrize("name, key", [("xlite", "xlite_graph_config.enabled=True"),
                                       ("kv nz", "enable_kv_nz=True")])
def test_options_that_would_bypass_or_misread_our_layers_are_refused(option_results, name, key):
    """vllm-ascend accepts them; the plugin refuses them where a layer is built, with the reason."""
    case = option_results[name]
    assert case["vllm_ascend"] == {"ok": True}, case
    error = case["plugin"]["error"]
    assert error.startswith("ValueError: mla-graph's vLLM plugin (MLA_GRAPH_VLLM=1) cannot run beside "
                            f"vllm-ascend's additional_config {key}: "), error
    assert error.endswith("Turn the option off or unset MLA_GRAPH_VLLM"), error


def test_vllm_ascend_leaves_the_weights_our_graphs_read_in_nd_layout():
    """weight_nz_mode=2 makes vllm-ascend's linear method cast bf16 weights to NZ after loading
    (torch_npu.npu_format_cast, recorded here). The layer's linears carry KEEP_ND, which that method
    reads: their weights stay the tensors the lowered graphs alias."""
    run = _run(VLLM_CONFIG + """
        import torch, torch_npu
        from torch import nn
        from vllm_ascend.ascend_config import init_ascend_config
        from vllm_ascend.ops.linear import AscendUnquantizedLinearMethod
        from mla_graph.vllm_plugin.ascend import KEEP_ND

        casts = []
        torch_npu.npu_format_cast = lambda weight, fmt, **kw: casts.append(fmt) or weight.clone()
        init_ascend_config(vllm_config({"weight_nz_mode": 2}, False))
        for keep_nd in (False, True):
            linear = nn.Module()
            linear.prefix = "model.layers.0.self_attn.kv_b_proj"
            linear.weight = nn.Parameter(torch.randn(64, 32, dtype=torch.bfloat16), requires_grad=False)
            if keep_nd:
                setattr(linear, KEEP_ND, True)
            before, casts[:] = linear.weight.data_ptr(), []
            AscendUnquantizedLinearMethod().process_weights_after_loading(linear)
            print("CAST", json.dumps({"keep_nd": keep_nd, "casts": casts, "same": linear.weight.data_ptr() == before}))
    """)
    results = {r["keep_nd"]: r for r in _lines(run, "CAST")}
    assert results[False]["casts"] == [29] and not results[False]["same"]   # ACL_FORMAT_FRACTAL_NZ: cast
    assert results[True] == {"keep_nd": True, "casts": [], "same": True}
