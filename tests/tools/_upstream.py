"""Imports upstream AdaFace's net.py from a checkout, a bare git mirror or the file itself."""

from __future__ import annotations

import importlib.util
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType


def import_upstream_net(source: Path) -> ModuleType:
    """Import net.py given the file, a work tree holding it, or a (bare) git repository."""
    source = Path(source)
    if source.is_file():
        path = source
    elif (source / "net.py").is_file():
        path = source / "net.py"
    else:
        # A bare mirror has no work tree: take HEAD's net.py out of git into a temp dir.
        text = subprocess.run(
            ["git", "-C", str(source), "show", "HEAD:net.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        path = Path(tempfile.mkdtemp(prefix="adaface_upstream_")) / "net.py"
        path.write_text(text)
    spec = importlib.util.spec_from_file_location("adaface_upstream_net", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Upstream constructors by arch name; build_model() itself only knows five of them.
UPSTREAM_CONSTRUCTORS = {
    "ir_18": "IR_18",
    "ir_34": "IR_34",
    "ir_50": "IR_50",
    "ir_101": "IR_101",
    "ir_152": "IR_152",
    "ir_200": "IR_200",
    "ir_se_50": "IR_SE_50",
    "ir_se_101": "IR_SE_101",
    "ir_se_152": "IR_SE_152",
    "ir_se_200": "IR_SE_200",
}
