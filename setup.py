"""Which packages mla-graph installs (pyproject.toml says everything else).

The passes live in passes/ at the top of the repo and install as `mla_graph.passes`, so nothing
named `passes` lands at the top of site-packages.
"""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["mla_graph", "mla_graph.*"]) + ["mla_graph.passes"],
      package_dir={"mla_graph.passes": "passes"})
