"""Layering rule from DESIGN.md: a pass never imports vLLM, torch_npu or the CLI."""
import ast
import pathlib

FORBIDDEN = ("vllm", "torch_npu", "mla_graph.cli")


def test_passes_do_not_import_vllm_torch_npu_or_cli():
    root = pathlib.Path(__file__).parent.parent / "passes"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("vllm", "torch_npu")
                          or n.startswith("mla_graph.cli")]
    assert offenders == []
    assert len(list(root.rglob("*.py"))) >= 5  # the scan really saw the package
