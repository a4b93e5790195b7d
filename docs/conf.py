"""Sphinx configuration of fem_moe's documentation: ``sphinx-build -W -b html docs docs/_build``
(``scripts/run docs`` does it in the project's stack)."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "_ext"))
sys.path.insert(0, os.path.dirname(HERE))
# Firedrake hands sys.argv to PETSc when autodoc imports it: sphinx's arguments are not PETSc's.
os.environ.setdefault("FIREDRAKE_DISABLE_OPTIONS_LEFT", "1")

project = "fem_moe"
author = "the fem_moe developers"
copyright = "the fem_moe developers"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.mathjax", "sphinx.ext.viewcode", "myst_parser",
              "literate_demos", "results_tables", "api_coverage"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]
root_doc = "index"

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "none"
# Docstrings cite the packages fem_moe builds on by name; they are not cross-referenced here.
nitpicky = False

html_theme = "alabaster"
html_title = "fem_moe"
html_theme_options = {"description": "Hard PDE constraints for neural networks, on Firedrake "
                                     "meshes, at scale", "page_width": "1100px"}
