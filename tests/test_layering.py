"""The package's import structure: layers, no cycles, what a pass may import, what gets installed.

The passes live in passes/ at the top of the repo and are the package mla_graph.passes once
installed (setup.py); the scans below read them under that name.
"""
import ast
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).parent.parent

FORBIDDEN = ("vllm", "torch_npu", "mla_graph.cli")


def test_passes_do_not_import_vllm_torch_npu_or_cli():
    root = ROOT / "passes"
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


# The module DAG, bottom to top: a module imports only modules of its own layer or below (at the top
# of the file or inside a function alike; `if TYPE_CHECKING:` imports, which never run, aside), and
# no modules import each other in a circle, within a layer or across. The definition and its
# primitives at the bottom, users at the top. A new module must be placed here (the test says so).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # (the graph contract is types only: capture makes it, passes extend it, the runtime reads it;
    # op_kinds names calls and tells views, markers and kernels apart, for the passes and the dumps)
    ("primitives", ("mla_graph.stacks", "mla_graph.config", "mla_graph.envflags", "mla_graph.rope", "mla_graph.cache",
                    "mla_graph.metadata", "mla_graph.inputs", "mla_graph.contract", "mla_graph.op_kinds", "mla_graph.primitives",
                    "mla_graph.cpu_kernels", "mla_graph.npu", "mla_graph.layer_op", "mla_graph.torch_compat")),
    ("definition", ("mla_graph.attention", "mla_graph.checking")),
    # what passes work on and write: capture, the dumps (written for the manager, read back, rendered
    # as the HTML report), kernel accounting
    ("graphs", ("mla_graph.capture", "mla_graph.dumptool", "mla_graph.kernels")),
    ("passes", ("mla_graph.passes",)),
    # what runs the passes or judges their graphs: the pass test harness, the real Ascend toolchain
    # (torchair's converters, torch-npu's meta functions), torchair's rules over a graph
    ("pass harness", ("mla_graph.testing",)),
    ("toolchain", ("mla_graph.ascend_toolchain",)),
    ("toolchain rules", ("mla_graph.torchair_compat",)),
    # the runtime (binding a call, graph mode, whole decode steps) beside the lowering that owns it
    ("lowering", ("mla_graph.runtime", "mla_graph.targets", "mla_graph.lowering", "mla_graph.model_lowering")),
    ("users", ("mla_graph.compile_backend", "mla_graph.hf", "mla_graph.vllm_plugin", "mla_graph.bench",
               "mla_graph.commands", "mla_graph.cli", "mla_graph")),
]


def _unit(module: str) -> str | None:
    """The LAYERS entry a module belongs to (its longest matching prefix)."""
    # "mla_graph" stands for the package's __init__ only (its re-exports), not for everything in it
    names = [n for _, names in LAYERS for n in names
             if module == n or (module.startswith(n + ".") and n != "mla_graph")]
    return max(names, key=len) if names else None


def _runs(tree: ast.AST) -> list[ast.stmt | ast.expr]:
    """The nodes of `tree` that execute: the bodies of `if TYPE_CHECKING:` left out."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    return [n for n in ast.walk(tree) if id(n) not in skipped]


def project_imports(sources: dict[str, str]) -> list[tuple[str, str]]:
    """(importer, imported) module pairs within the project, from each module's source.
    `from package import name` imports the module package.name where there is one."""
    modules = {m.removesuffix(".__init__") for m in sources}
    edges = []
    for module, text in sources.items():
        is_package = module.endswith(".__init__")
        name = module[: -len(".__init__")] if is_package else module
        for node in _runs(ast.parse(text)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                parts = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
                target = ".".join(p for p in (base, node.module) if p)
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            edges += [(name, t) for t in targets if t.split(".")[0] in ("mla_graph", "passes")]
    return edges


def import_cycles(sources: dict[str, str]) -> list[list[str]]:
    """The circles of the module import graph (each a sorted list of modules)."""
    import networkx as nx

    modules = {m.removesuffix(".__init__") for m in sources}
    graph = nx.DiGraph()
    for importer, imported in project_imports(sources):
        while imported and imported not in modules:   # a name in a module: that module
            imported = imported.rpartition(".")[0]
        if imported and imported != importer:
            graph.add_edge(importer, imported)
    return sorted(sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1)


def back_edges(sources: dict[str, str]) -> list[str]:
    rank = {n: i for i, (_, names) in enumerate(LAYERS) for n in names}
    problems = []
    for importer, imported in project_imports(sources):
        a, b = _unit(importer), _unit(imported)
        if a is None:
            problems.append(f"{importer} is in no layer of LAYERS (tests/test_layering.py): place it")
        elif b is not None and rank[b] > rank[a]:
            problems.append(f"{importer} ({LAYERS[rank[a]][0]}) imports {imported} ({LAYERS[rank[b]][0]}): a back edge")
        elif imported.split(".")[0] == "passes":
            problems.append(f"{importer} imports {imported}: the passes are mla_graph.passes")
    return sorted(set(problems))


def _sources() -> dict[str, str]:
    """Each module's source by its installed name (passes/x.py is mla_graph.passes.x)."""
    out = {}
    for folder, package in (("mla_graph", "mla_graph"), ("passes", "mla_graph.passes")):
        for path in sorted((ROOT / folder).rglob("*.py")):
            out[".".join((package, *path.relative_to(ROOT / folder).with_suffix("").parts))] = path.read_text()
    return out


def test_no_back_edges_in_the_module_dag():
    sources = _sources()
    assert len(sources) > 60 and "mla_graph.passes.manager" in sources   # the scan saw the packages
    assert back_edges(sources) == []


def test_no_import_cycles():
    assert import_cycles(_sources()) == []


def test_a_back_edge_fails_the_dag_test():
    """The definition importing a user (as attention.py once imported the compile backend), a lazy
    import inside a function included; a module placed in no layer; the old top-level name."""
    sources = _sources()
    sources["mla_graph.attention"] += "\n\ndef _lazy():\n    from .compile_backend import backend\n"
    sources["mla_graph.newthing"] = "from .config import MLAConfig\n"
    sources["mla_graph.lowering"] += "\nimport passes.manager\n"
    assert back_edges(sources) == [
        "mla_graph.attention (definition) imports mla_graph.compile_backend.backend (users): a back edge",
        "mla_graph.lowering imports passes.manager: the passes are mla_graph.passes",
        "mla_graph.newthing is in no layer of LAYERS (tests/test_layering.py): place it",
    ]


def test_an_import_cycle_fails_whatever_the_layers_say():
    """Two modules of one layer importing each other (as the compile backend and its whole-step
    runner did, lazily; here the lowering and the runtime's binding), and a package and its submodule
    through a name of the package; an import under `if TYPE_CHECKING:` is no cycle (it never runs)."""
    sources = _sources()
    sources["mla_graph.runtime.binding"] += "\n\ndef _lazy():\n    from ..lowering import LoweredMLA\n"
    sources["mla_graph.npu.fia_limits"] += "\nfrom mla_graph.npu import ensure_npu_ops\n"
    sources["mla_graph.npu.fia_layout"] += "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n" \
                                          "    from mla_graph.npu.fia import FiaCall\n"
    assert back_edges(sources) == []
    cycles = import_cycles(sources)
    assert any({"mla_graph.lowering", "mla_graph.runtime.binding"} <= set(c) for c in cycles)
    assert any({"mla_graph.npu", "mla_graph.npu.fia_limits"} <= set(c) for c in cycles)
    assert not any("mla_graph.npu.fia_layout" in c for c in cycles)


_IMPORT_EACH = r'''
import os, sys
# third-party modules the children share (loaded once, before the forks); none of ours is loaded
import torch, torch._dynamo, torch.fx.experimental.proxy_tensor, networkx, transformers  # noqa: F401,E401
failed = 0
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:                 # a child: a fresh import of this one module of ours, first
        try:
            __import__(module)
        except BaseException as exc:
            print(f"{module}: {type(exc).__name__}: {exc}", flush=True)
            os._exit(1)
        os._exit(0)
    failed += os.waitpid(pid, 0)[1] != 0
sys.exit(1 if failed else 0)
'''


def test_every_module_imports_on_its_own():
    """Each module of passes/ and mla_graph/ can be the first one a program imports (a user's pass
    importing passes.npu_lower first once hit a circular import through mla_graph/__init__)."""
    root = ROOT
    modules = [f"mla_graph.passes.{p.stem}" for p in sorted((root / "passes").glob("*.py")) if p.stem != "__init__"]
    modules += [f"mla_graph.{p.stem}" for p in sorted((root / "mla_graph").glob("*.py")) if p.stem != "__init__"]
    modules += [f"mla_graph.{p.name}" for p in sorted((root / "mla_graph").iterdir())
                if (p / "__init__.py").is_file() and p.name != "vllm_plugin"]   # that one needs vLLM
    # the manager writes dumps with mla_graph.dumptool, which renders graphs with passes' helpers
    modules += [f"mla_graph.{package}.{p.stem}" for package in ("dumptool", "runtime")
                for p in sorted((root / "mla_graph" / package).glob("*.py")) if p.stem != "__init__"]
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *modules], cwd=root, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert len(modules) > 30


def test_the_package_still_offers_what_it_loads_late():
    """After a plain `import mla_graph`: dir() lists the lowering entry points, and submodules such
    as mla_graph.lowering are reachable as attributes (in a fresh interpreter)."""
    code = ("import mla_graph, sys; assert 'mla_graph.lowering' not in sys.modules; "
            "assert {'lower', 'LoweredMLA', 'LoweringError'} <= set(dir(mla_graph)); "
            "assert mla_graph.lowering.lower is mla_graph.lower; "
            "assert not hasattr(mla_graph, 'no_such_thing')")
    result = subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).parent.parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_install_puts_the_passes_inside_mla_graph(tmp_path):
    """The wheel `pip install .` installs from a clean tree: the passes as mla_graph.passes, nothing
    named `passes` (or anything else but mla_graph) at the top of site-packages, every data file
    (converter tables, the HTML report's script and style)."""
    import shutil

    source = tmp_path / "source"   # a copy: building in place would leave build/ in the repo
    for name in ("mla_graph", "passes"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheel"),
                            str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = (tmp_path / "wheel").glob("mla_graph-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"mla_graph"}
    passes = {n.removeprefix("mla_graph/passes/") for n in names if n.startswith("mla_graph/passes/")}
    assert passes == {p.name for p in (ROOT / "passes").glob("*.py")}
    data = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mla_graph").rglob("*")
            if p.suffix in (".txt", ".json", ".js", ".css")}
    assert data and data <= set(names), sorted(data - set(names))   # the data files a fresh clone installs

