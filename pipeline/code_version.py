"""Which code made a node: a hash of the source that computes nodes, recorded in its DONE.

A fingerprint names what a node computes (its settings and its parents), not the code that
computed it, so a node store kept across code changes can hold nodes made by several versions
of the code under the same fingerprints, and figures that moved when the code changed. The
report says so when it finds more than one.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import deepfusion_core
import pipeline


@functools.cache
def code_version() -> str:
    """The first 12 hex digits of the sha256 of every Python file of `deepfusion_core` and
    `pipeline`, by relative path: the same for any checkout or install of the same code."""
    digest = hashlib.sha256()
    for package in (deepfusion_core, pipeline):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package.__name__}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
