"""scrit: a self-evolving critic (SCRIT) on Ray. The core package stays Ray-free so it imports fast."""

__version__ = "0.1.0"


def _map_checkout_subpackages() -> None:
    """Make ``scrit.actors``, ``scrit.train`` and ``scrit.serve`` importable from a bare source checkout.

    They live in the top-level ``actors/``, ``train/`` and ``serve/`` folders, which an install maps
    into the package (setuptools ``package-dir``). A checkout put on ``sys.path`` as is, as
    ``ray job submit --working-dir .`` does (the uploaded folder goes first on every worker's
    PYTHONPATH), has no such mapping, and ``import scrit.actors`` would fail where scrit is installed
    normally. Adding the checkout root to this package's search path maps them the same way. Nothing
    happens for an installed package (no ``pyproject.toml`` beside it).
    """
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if not os.path.isfile(os.path.join(root, "pyproject.toml")):
        return
    for name in ("actors", "train", "serve"):
        if os.path.exists(os.path.join(here, name)) or not os.path.isfile(os.path.join(root, name, "__init__.py")):
            return
    if root not in __path__:
        __path__.append(root)


_map_checkout_subpackages()
