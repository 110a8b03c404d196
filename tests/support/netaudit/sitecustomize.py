"""Installs netaudit's hook when CLIPLINE_NET_AUDIT_DIR is set, then runs the sitecustomize this one hides.

Only tests/support/watched.py puts this directory on PYTHONPATH, and only for the run it watches.
"""

import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))

if os.environ.get("CLIPLINE_NET_AUDIT_DIR"):
    sys.path.insert(0, _HERE)
    try:
        import netaudit

        netaudit.install(os.environ["CLIPLINE_NET_AUDIT_DIR"])
    finally:
        sys.path.remove(_HERE)


def _chain() -> None:
    """Run the next sitecustomize on sys.path, if any: being first on PYTHONPATH must not switch it off."""
    rest = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_chain()
