"""One dispatcher for every kernel op.

Each op registers its implementations by backend name. ``get(op, backend)`` returns the callable;
``backend="auto"`` takes the fastest available and eligible one, in the order
``triton > chunk > reference``; ``triton`` is eligible for ``auto`` only when the call's tensors
live on a GPU (``device``), so CPU tensors never land in Triton's interpreter unless it is asked
for by name. The environment variable ``NLGRAPH_BACKEND`` forces a backend for
the whole process (``reference`` is the usual choice when debugging a mismatch). The choice is
logged once per (op, backend).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from nlgraph._errors import BackendUnavailableError

__all__ = ["BACKENDS", "register", "get", "available", "resolve_backend", "for_op"]

log = logging.getLogger("nlgraph.kernels")

BACKENDS = ("reference", "chunk", "triton")
_AUTO_ORDER = ("triton", "chunk", "reference")

# op -> backend -> (fn, is_available)
_REGISTRY: dict[str, dict[str, tuple[Callable[..., Any], Callable[[], bool]]]] = {}
_LOGGED: set[tuple[str, str]] = set()


def _always() -> bool:
    return True


def register(
    op: str, backend: str, fn: Callable[..., Any], available: Callable[[], bool] = _always
) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = (fn, available)


def available(op: str) -> list[str]:
    """Backends of ``op`` usable in this process, fastest first."""
    impls = _REGISTRY.get(op, {})
    return [b for b in _AUTO_ORDER if b in impls and impls[b][1]()]


def _auto_eligible(backend: str, device: Any) -> bool:
    if backend != "triton":
        return True
    return device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda"


def resolve_backend(op: str, backend: str = "auto", device: Any = None) -> str:
    """The backend name ``get`` would use for ``op`` on tensors living on ``device`` (a
    ``torch.device``, a string, or None when unknown: then ``auto`` never picks ``triton``)."""
    forced = os.environ.get("NLGRAPH_BACKEND")
    if forced:
        backend = forced
    if op not in _REGISTRY:
        raise BackendUnavailableError(
            f"no kernel registered for op {op!r}; known: {sorted(_REGISTRY)}"
        )
    if backend == "auto":
        choices = [b for b in available(op) if _auto_eligible(b, device)]
        if not choices:
            raise BackendUnavailableError(f"op {op!r} has no available backend")
        return choices[0]
    if backend not in BACKENDS:
        raise BackendUnavailableError(
            f"unknown backend {backend!r} for op {op!r}; expected 'auto' or one of {BACKENDS}"
        )
    impls = _REGISTRY[op]
    if backend not in impls:
        raise BackendUnavailableError(
            f"op {op!r} has no {backend!r} implementation; it has {sorted(impls)}"
        )
    if not impls[backend][1]():
        raise BackendUnavailableError(
            f"the {backend!r} backend of op {op!r} is not available here "
            f"(available: {available(op)}); use backend='auto'"
            + (
                ", or run on a CUDA device (or set TRITON_INTERPRET=1 before importing nlgraph "
                "for Triton's CPU interpreter)"
                if backend == "triton"
                else " or install what it needs"
            )
        )
    return backend


def for_op(op: str, backend: str) -> str:
    """A learner-wide backend applied to one op: ``"triton"`` means the op's Triton kernel where
    it has one and its chunked form otherwise; every other name passes through unchanged."""
    if backend == "triton" and "triton" not in _REGISTRY.get(op, {}):
        return "chunk"
    return backend


def _compiling() -> bool:
    # Logging inside a torch.compile trace is a graph break; log from eager calls only.
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def get(op: str, backend: str = "auto", device: Any = None) -> Callable[..., Any]:
    """The implementation of ``op`` for ``backend``: auto, reference, chunk or triton (see
    :func:`resolve_backend` for ``device``)."""
    name = resolve_backend(op, backend, device)
    if (op, name) not in _LOGGED and not _compiling():
        _LOGGED.add((op, name))
        log.info("nlgraph: op %s uses backend %s", op, name)
    return _REGISTRY[op][name][0]
