"""Which packages mla-graph installs (pyproject.toml says everything else).

The passes live in passes/ at the top of the repo and install as `mla_graph.passes`, so nothing
named `passes` lands at the top of site-packages.
"""
from setuptools import find_namespace_packages, setup

# namespace packages too: mla_graph/data (the converter tables) is a folder of data files only
setup(packages=find_namespace_packages(include=["mla_graph", "mla_graph.*"], exclude=["*.__pycache__"])
      + ["mla_graph.passes"],
      package_dir={"mla_graph.passes": "passes"})
