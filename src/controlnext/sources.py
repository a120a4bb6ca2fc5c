"""Where a model or dataset name points: a local path or a hub id, and one error for a path that is not there.

A name that can only be a path (it starts with ``.``, ``/`` or ``~``, or contains a path separator without being
an ``owner/name`` id, or its first part is a folder here) is never sent to the hub: a mistyped path gets a
one-line error instead of a network error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["HUB_ID", "is_local_path", "require_dataset_source", "require_model_source"]

# A hub repository id: owner/name, letters, digits, '-', '_' and '.' (no leading '.' or '-').
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def is_local_path(spec: str) -> bool:
    """True when ``spec`` names a local path (whether or not it exists), False when it may be a hub id."""
    spec = str(spec)
    if spec.startswith((".", "/", "~")):
        return True
    separators = {os.sep, os.altsep or os.sep}
    if any(sep in spec for sep in separators) and not HUB_ID.match(spec):
        return True
    # 'data/run1' where ./data exists is a path here, not the hub repository of a user called 'data'.
    return bool(HUB_ID.match(spec)) and Path(spec.split("/")[0]).is_dir()


def require_model_source(spec: str, label: str) -> None:
    """Raise FileNotFoundError unless ``spec`` is an existing path or could be a hub id ('owner/name').

    ``label`` names the option (``--model``, ``--dataset``) in the one-line error.
    """
    if Path(spec).expanduser().exists():
        return
    if is_local_path(spec) or not HUB_ID.match(str(spec)):
        raise FileNotFoundError(
            f"{label} {spec}: no such folder, and not a hub id ('owner/name'); give the path of a diffusers model "
            "folder or a hub id."
        )


def require_dataset_source(spec: str, label: str) -> None:
    """Raise FileNotFoundError when ``spec`` is a local path that does not exist (a hub dataset id passes)."""
    if is_local_path(spec) and not Path(spec).expanduser().exists():
        raise FileNotFoundError(
            f"{label} {spec} does not exist (no such file or folder); give an existing dataset folder or file, or a "
            "hub dataset id."
        )
