"""Sphinx configuration of the lojax documentation (``python -m sphinx -W -b html docs
docs/_build/html``; ``tests/test_docs_site.py`` builds it the same way and checks its links).

Sphinx because JAX, Flax and optax document themselves with it: their users know its API
pages and cross-references. Pages are Markdown (MyST); the API reference is autodoc over the
docstrings (Google style, napoleon), which ``tests/test_docs.py`` also runs as doctests. The
targeting rules' name lists are rendered from the matcher's own tables (``substitutions``), so
the docs cannot drift from the code.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lojax  # noqa: E402
from lojax._src import matcher  # noqa: E402
from lojax._src import tokens  # noqa: E402

project = "lojax"
author = "the lojax authors"
release = version = lojax.__version__
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon",
              "sphinx.ext.viewcode"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
html_theme = "sphinx_book_theme"
html_title = "lojax"
html_theme_options = {"repository_url": "https://github.com/lojax/lojax", "use_repository_button": False}
myst_enable_extensions = ["substitution", "colon_fence", "deflist"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False


def _names(xs) -> str:
  return ", ".join(f"`{x}`" for x in sorted(xs))


# The rules' name lists, written once in lojax/_src/matcher.py and tokens.py.
myst_substitutions = {
    "head_names": _names(matcher.HEAD_NAMES),
    "attention_names": _names(matcher.ATTENTION_NAMES),
    "attention_prefixes": _names(matcher.ATTENTION_PREFIXES),
    "attention_last": _names(matcher.ATTENTION_LAST),
    "mlp_names": _names(matcher.MLP_NAMES),
    "mlp_last": _names(matcher.MLP_LAST),
    "vision_parts": _names(matcher.VISION_PARTS),
    "input_embedding_names": _names(tokens.INPUT_NAMES),
}
html_static_path = ["_static"]
html_css_files = ["lojax.css"]
