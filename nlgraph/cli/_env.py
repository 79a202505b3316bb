"""``nlgraph env``: versions, devices and kernel backends, for bug reports."""

from __future__ import annotations

import argparse
import os

from nlgraph._errors import NLGraphError


def _cmd_env(args: argparse.Namespace) -> int:
    import platform

    rows: list[tuple[str, str]] = []
    import nlgraph

    rows.append(("nlgraph", nlgraph.__version__))
    rows.append(("python", f"{platform.python_version()} ({platform.python_implementation()})"))
    rows.append(("platform", platform.platform()))
    for name in ("torch", "triton", "numpy", "pydantic", "networkx", "graphviz", "matplotlib"):
        rows.append((name, _version(name)))
    rows.append(("dot", _dot_version()))
    try:
        import torch
    except ImportError:
        rows.append(("cuda", "torch not installed"))
    else:
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            names = ", ".join(torch.cuda.get_device_name(i) for i in range(n))
            rows.append(("cuda", f"available: {n} device(s): {names} (CUDA {torch.version.cuda})"))
        else:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
            rows.append(("cuda", f"not available (torch build: {build})"))
        rows.append(("threads", str(torch.get_num_threads())))
        rows += _kernel_rows()
    from nlgraph.kernels._dispatch import backend_setting

    rows.append(("NLGRAPH_BACKEND", backend_setting() or "(unset)"))
    rows.append(("NLGRAPH_DEBUG", _debug_row()))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:{width}s}  {v}" for k, v in rows))
    return 0


def _debug_row() -> str:
    """NLGRAPH_DEBUG as set, and whether the compiler accepts it (compiler/_debug.py)."""
    from nlgraph.compiler._debug import VARIABLE, debug_level

    value = os.environ.get(VARIABLE)
    if value is None:
        return "(unset)"
    try:
        debug_level()
    except NLGraphError:
        return f"{value} (not a debug level: compiling fails; expected 0, 1 or 2)"
    return value


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _dot_version() -> str:
    import shutil
    import subprocess

    exe = shutil.which("dot")
    if exe is None:
        return "not found on PATH"
    try:
        done = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as err:
        return f"{exe}: cannot run ({err})"
    text = (done.stderr or done.stdout).strip().splitlines()
    return f"{text[0] if text else 'unknown version'} ({exe})"


def _kernel_rows() -> list[tuple[str, str]]:
    """Available backends per registered kernel op, fastest first, and what ``auto`` picks."""
    import importlib

    from nlgraph.kernels import _dispatch

    rows = []
    for mod in ("linear_memory", "deep_memory"):
        try:
            importlib.import_module(f"nlgraph.kernels.{mod}")
        except ImportError as err:
            rows.append((f"kernel {mod}", f"cannot import: {err}"))
    for op in sorted(_dispatch._REGISTRY):
        try:
            picked = f"auto picks {_dispatch.resolve_backend(op)}"
        except NLGraphError as err:
            picked = f"auto fails: {err}"
        rows.append((f"kernel {op}", f"{', '.join(_dispatch.available(op))} ({picked})"))
    return rows


# ------------------------------------------------------------------------------ parser
