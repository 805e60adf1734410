"""k3lab's Hydra sweeper plugin (Hydra finds plugins only under the ``hydra_plugins`` namespace package)."""


def register() -> None:
    """Make ``hydra/sweeper=fractional`` known to Hydra where its plugin scan cannot see it: an editable install
    (``pip install -e``) serves this package through an import hook that ``pkgutil.walk_packages`` does not list. A
    wheel install is found by the scan itself; registering twice is harmless. The scan runs first: it re-imports
    Hydra's own plugin modules, and the sweeper must subclass the ``BasicSweeper`` that Hydra then holds."""
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()
    from hydra_plugins.k3lab_sweeper.fractional_sweeper import FractionalSweeper

    name = f"{FractionalSweeper.__module__}.{FractionalSweeper.__name__}"
    plugins.class_name_to_class.setdefault(name, FractionalSweeper)  # Hydra's own registry (no public API for it)
