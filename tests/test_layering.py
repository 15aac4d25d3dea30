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


# The module DAG, bottom to top: a module imports only modules of its own layer or below (at the top
# of the file or inside a function alike). The definition and its primitives at the bottom, users at
# the top. A new module must be placed here (the test says so).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # (the graph contract is types only: capture makes it, passes extend it, the runtime reads it)
    ("primitives", ("mla_graph.stacks", "mla_graph.config", "mla_graph.envflags", "mla_graph.rope", "mla_graph.cache",
                    "mla_graph.metadata", "mla_graph.contract", "mla_graph.primitives", "mla_graph.cpu_kernels",
                    "mla_graph.npu", "mla_graph.layer_op", "mla_graph.torch_compat")),
    ("definition", ("mla_graph.attention", "mla_graph.checking")),
    # passes, capture, the dumps (mla_graph.dumptool writes them for the manager, reads them back and
    # renders the HTML report lower() writes with dump_formats=html), the pass test harness, kernel
    # accounting, torchair's rules
    ("compiler", ("passes", "mla_graph.capture", "mla_graph.dumptool", "mla_graph.testing", "mla_graph.kernels",
                  "mla_graph.torchair_compat", "mla_graph.ascend_toolchain")),
    ("lowering", ("mla_graph.targets", "mla_graph.torchair_runtime", "mla_graph.lowering",
                  "mla_graph.model_lowering")),
    ("users", ("mla_graph.compile_backend", "mla_graph.hf", "mla_graph.vllm_plugin", "mla_graph.bench",
               "mla_graph.commands", "mla_graph.cli", "mla_graph")),
]


def _unit(module: str) -> str | None:
    """The LAYERS entry a module belongs to (its longest matching prefix)."""
    # "mla_graph" stands for the package's __init__ only (its re-exports), not for everything in it
    names = [n for _, names in LAYERS for n in names
             if module == n or (module.startswith(n + ".") and n != "mla_graph")]
    return max(names, key=len) if names else None


def project_imports(sources: dict[str, str]) -> list[tuple[str, str]]:
    """(importer, imported) module pairs within the project, from each module's source."""
    edges = []
    for module, text in sources.items():
        is_package = module.endswith(".__init__")
        name = module[: -len(".__init__")] if is_package else module
        for node in ast.walk(ast.parse(text)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                parts = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
                target = ".".join(p for p in (base, node.module) if p)
                # `from . import x` imports the module x, not the package
                targets = [f"{target}.{a.name}" for a in node.names] if node.module is None else [target]
            edges += [(name, t) for t in targets if t.split(".")[0] in ("mla_graph", "passes")]
    return edges


def back_edges(sources: dict[str, str]) -> list[str]:
    rank = {n: i for i, (_, names) in enumerate(LAYERS) for n in names}
    problems = []
    for importer, imported in project_imports(sources):
        a, b = _unit(importer), _unit(imported)
        if a is None:
            problems.append(f"{importer} is in no layer of LAYERS (tests/test_layering.py): place it")
        elif b is not None and rank[b] > rank[a]:
            problems.append(f"{importer} ({LAYERS[rank[a]][0]}) imports {imported} ({LAYERS[rank[b]][0]}): a back edge")
    return sorted(set(problems))


def _sources() -> dict[str, str]:
    root = pathlib.Path(__file__).parent.parent
    out = {}
    for package in ("mla_graph", "passes"):
        for path in sorted((root / package).rglob("*.py")):
            out[".".join(path.relative_to(root).with_suffix("").parts)] = path.read_text()
    return out


def test_no_back_edges_in_the_module_dag():
    sources = _sources()
    assert len(sources) > 60   # the scan saw the packages
    assert back_edges(sources) == []


def test_a_back_edge_fails_the_dag_test():
    """The definition importing a user (as attention.py once imported the compile backend), a lazy
    import inside a function included; and a module placed in no layer."""
    sources = _sources()
    sources["mla_graph.attention"] += "\n\ndef _lazy():\n    from .compile_backend import backend\n"
    sources["mla_graph.newthing"] = "from .config import MLAConfig\n"
    assert back_edges(sources) == [
        "mla_graph.attention (definition) imports mla_graph.compile_backend (users): a back edge",
        "mla_graph.newthing is in no layer of LAYERS (tests/test_layering.py): place it",
    ]


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
    import subprocess
    import sys

    root = pathlib.Path(__file__).parent.parent
    modules = [f"passes.{p.stem}" for p in sorted((root / "passes").glob("*.py")) if p.stem != "__init__"]
    modules += [f"mla_graph.{p.stem}" for p in sorted((root / "mla_graph").glob("*.py")) if p.stem != "__init__"]
    modules += [f"mla_graph.{p.name}" for p in sorted((root / "mla_graph").iterdir())
                if (p / "__init__.py").is_file() and p.name != "vllm_plugin"]   # that one needs vLLM
    # the manager writes dumps with mla_graph.dumptool, which renders graphs with passes' helpers
    modules += [f"mla_graph.dumptool.{p.stem}" for p in sorted((root / "mla_graph" / "dumptool").glob("*.py"))
                if p.stem != "__init__"]
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *modules], cwd=root, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert len(modules) > 30


def test_the_package_still_offers_what_it_loads_late():
    """After a plain `import mla_graph`: dir() lists the lowering entry points, and submodules such
    as mla_graph.lowering are reachable as attributes (in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import mla_graph, sys; assert 'mla_graph.lowering' not in sys.modules; "
            "assert {'lower', 'LoweredMLA', 'LoweringError'} <= set(dir(mla_graph)); "
            "assert mla_graph.lowering.lower is mla_graph.lower; "
            "assert not hasattr(mla_graph, 'no_such_thing')")
    result = subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).parent.parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def _top_level_names(module) -> set[str]:
    """The public names a module's own source defines at the top level (defs, classes, assignments)."""
    import ast
    import inspect

    names = set()
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return {n for n in names if not n.startswith("_")}


def test_moved_modules_keep_their_old_import_paths():
    """The harness, the graph contract and the dump rendering moved out of passes/ (to
    mla_graph.testing, mla_graph.contract, mla_graph.dumptool.render); code written against
    passes.testing / passes.contract / passes.dump still imports them, every public name included."""
    import mla_graph.contract
    import mla_graph.dumptool.render
    import mla_graph.testing
    import passes.contract
    import passes.dump
    import passes.testing

    for new, old in ((mla_graph.testing, passes.testing), (mla_graph.contract, passes.contract),
                     (mla_graph.dumptool.render, passes.dump)):
        defined = _top_level_names(new)
        assert defined <= set(new.__all__), f"{new.__name__}.__all__ lacks {sorted(defined - set(new.__all__))}"
        assert all(getattr(old, name) is getattr(new, name) for name in new.__all__)
    assert passes.testing.check_pass is mla_graph.testing.check_pass
