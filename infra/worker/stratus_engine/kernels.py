"""Stratus's own onnxruntime kernels (infra/worker/kernels): where the built library is.

A graph configuration that uses them (manifest `"kernels": true`: fused-linear, fused-split) is served only
where the library loads; elsewhere the start-up check skips it for the next configuration, so a
host without the library serves the same text a little slower.

STRATUS_KERNELS names the library (the worker images set it); unset, it is the checkout's
build/kernels/libstratus_kernels.so, which `make kernels` builds.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "STRATUS_KERNELS"
CHECKOUT_LIBRARY = Path(__file__).resolve().parents[3] / "build" / "kernels" / "libstratus_kernels.so"


def library() -> Path | None:
    """The kernels library to register with onnxruntime, or None where it is not built."""
    named = os.environ.get(ENV)
    path = Path(named) if named else CHECKOUT_LIBRARY
    return path if path.is_file() else None


def missing() -> str:
    """Why library() is None, for the start-up check's report."""
    named = os.environ.get(ENV)
    if named:
        return f"{ENV}={named} is not a file"
    return f"the kernels library is not built ({CHECKOUT_LIBRARY}: `make kernels`)"
