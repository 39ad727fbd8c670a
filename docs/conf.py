"""Sphinx configuration for coord's documentation.

Build (from the repository root, with the ``docs`` extra installed)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

The pages are markdown (MyST); the API reference under ``api/`` is generated from the
docstrings, which are Google style (``Args:``, ``Returns:``, ``Raises:``).
"""

import sys
from pathlib import Path

# Document the coord of this tree, not an installed one.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import coord

project = "coord"
author = "coord contributors"
copyright = "coord contributors"
release = coord.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
# No sphinx.ext.intersphinx: it fetches the other projects' inventories over the
# network, and builds here (and in CI) must work offline.

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# -- MyST ---------------------------------------------------------------------------------

# The pages link to their own sections by GitHub's anchors ("#how-it-works"): make the
# same anchors for headings down to ####.
myst_heading_anchors = 4
myst_enable_extensions = ["deflist"]

# -- autodoc and napoleon -----------------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True}
# A class's docstring says what it is; __init__'s arguments are in it ("Args:").
autoclass_content = "class"

napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections become fields of the class, not separate attribute entries
# (which would clash with the attributes autodoc documents itself).
napoleon_use_ivar = True
napoleon_use_rtype = False

# Single backticks in docstrings (`coord.server.EtcdServer`) are Python references.
default_role = "py:obj"



def _skip_member(app, what, name, obj, skip, options):
    """Leave out of the reference what is not for applications: class attributes that
    only name a class (``Lock.lost_error``, ``PathGateway.protocol``: implementation
    hooks), and members whose docstring says they are internal."""
    if what == "class" and isinstance(obj, type):
        return True
    if name in _INTERNAL:
        return True
    return None


# Public by name, internal by their docstrings.
_INTERNAL = {"watch_hub"}


def setup(app):
    app.connect("autodoc-skip-member", _skip_member)


# -- HTML ---------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"coord {release}"
html_static_path: list[str] = []
