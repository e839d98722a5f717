"""Shim for `python client/gallery.py COMMAND ...`: runs adaface_client.gallery_cli uninstalled."""

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# Make `adaface_client` (beside this file) and the generated `adaface` stubs (../protos)
# importable from a plain checkout; an installed package is used as it is.
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
if importlib.util.find_spec("adaface") is None:
    sys.path.insert(1, os.path.join(os.path.dirname(_HERE), "protos"))

from adaface_client.gallery_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
