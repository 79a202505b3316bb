"""One dispatcher for every kernel op, and the one reader of ``NLGRAPH_BACKEND``.

Each op registers its implementations by backend name. ``get(op, backend)`` returns the callable;
``backend="auto"`` takes the fastest available and eligible one, in the order
``triton > chunk > reference``. Two rules make a backend eligible for ``auto``:

- ``triton`` only when the call's tensors live on a GPU (``device``), so CPU tensors never land
  in Triton's interpreter unless it is asked for by name;
- a backend registered with ``eligible=`` only when that predicate accepts the call's arguments
  (a kernel without a float64 path, or with a size limit, leaves those calls to the next one).

A backend asked for by name is never second-guessed: it runs, or raises its own error. The
environment variable ``NLGRAPH_BACKEND`` (read by :func:`forced_backend`, and nowhere else in
nlgraph) forces a backend for the whole process (``reference`` is the usual choice when
debugging a mismatch). The choice is logged once per (op, backend).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from nlgraph._errors import BackendUnavailableError

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "backend_setting",
    "forced_backend",
    "register",
    "get",
    "call",
    "available",
    "resolve_backend",
    "for_op",
]

log = logging.getLogger("nlgraph.kernels")

BACKENDS = ("reference", "chunk", "triton")
ENV_VAR = "NLGRAPH_BACKEND"
_AUTO_ORDER = ("triton", "chunk", "reference")

# op -> backend -> (fn, is_available)
_REGISTRY: dict[str, dict[str, tuple[Callable[..., Any], Callable[[], bool]]]] = {}
# (op, backend) -> eligible(*args, **kwargs): may auto pick it for these arguments?
_ELIGIBLE: dict[tuple[str, str], Callable[..., bool]] = {}
_LOGGED: set[tuple[str, str]] = set()


def _always() -> bool:
    return True


def backend_setting() -> str | None:
    """``NLGRAPH_BACKEND`` as set (None when unset), unchecked: what ``nlgraph env`` shows."""
    return os.environ.get(ENV_VAR)


def forced_backend() -> str | None:
    """The backend ``NLGRAPH_BACKEND`` forces on every op, or None when it is unset, empty or
    ``auto`` (each op then chooses for itself).

    Raises:
        BackendUnavailableError: the variable names no backend (the message lists the allowed
            values).

    Example:
        >>> import os
        >>> os.environ["NLGRAPH_BACKEND"] = "reference"
        >>> forced_backend()
        'reference'
        >>> del os.environ["NLGRAPH_BACKEND"]
        >>> forced_backend() is None
        True
    """
    value = os.environ.get(ENV_VAR, "").strip()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise BackendUnavailableError(
            f"{ENV_VAR}={value!r} names no backend; expected one of {', '.join(BACKENDS)} "
            f"(or 'auto', or unset it, to let each op choose)"
        )
    return value


def register(
    op: str,
    backend: str,
    fn: Callable[..., Any],
    available: Callable[[], bool] = _always,
    eligible: Callable[..., bool] | None = None,
) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``.

    Args:
        available: whether the backend can run in this process at all (e.g. Triton imports).
        eligible: called with the arguments of a call (as :func:`call` passes them to ``fn``),
            whether ``auto`` may pick this backend for them; None accepts every call.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = (fn, available)
    if eligible is None:
        _ELIGIBLE.pop((op, backend), None)
    else:
        _ELIGIBLE[(op, backend)] = eligible


def available(op: str) -> list[str]:
    """Backends of ``op`` usable in this process, fastest first."""
    impls = _REGISTRY.get(op, {})
    return [b for b in _AUTO_ORDER if b in impls and impls[b][1]()]


def _auto_eligible(backend: str, device: Any) -> bool:
    if backend != "triton":
        return True
    return device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda"


def _fits(op: str, backend: str, args: tuple | None, kwargs: Mapping[str, Any] | None) -> bool:
    check = _ELIGIBLE.get((op, backend))
    if check is None or args is None:  # no inputs known: only the device rule applies
        return True
    return bool(check(*args, **(kwargs or {})))


def resolve_backend(
    op: str,
    backend: str = "auto",
    device: Any = None,
    args: tuple | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The backend name ``get`` would use for ``op`` on tensors living on ``device`` (a
    ``torch.device``, a string, or None when unknown: then ``auto`` never picks ``triton``).

    ``args``/``kwargs``: the call's arguments, for the backends registered with ``eligible``;
    without them only the device rule decides."""
    forced = forced_backend()
    if forced:
        backend = forced
    if op not in _REGISTRY:
        raise BackendUnavailableError(
            f"no kernel registered for op {op!r}; known: {sorted(_REGISTRY)}"
        )
    if backend == "auto":
        choices = [
            b for b in available(op) if _auto_eligible(b, device) and _fits(op, b, args, kwargs)
        ]
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


def get(
    op: str,
    backend: str = "auto",
    device: Any = None,
    args: tuple | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> Callable[..., Any]:
    """The implementation of ``op`` for ``backend``: auto, reference, chunk or triton (see
    :func:`resolve_backend` for ``device``, ``args`` and ``kwargs``)."""
    name = resolve_backend(op, backend, device, args, kwargs)
    if (op, name) not in _LOGGED and not _compiling():
        _LOGGED.add((op, name))
        log.info("nlgraph: op %s uses backend %s", op, name)
    return _REGISTRY[op][name][0]


def call(op: str, backend: str, device: Any, *args: Any, **kwargs: Any) -> Any:
    """``op(*args, **kwargs)`` on the backend :func:`get` picks for these arguments."""
    return get(op, backend, device, args, kwargs)(*args, **kwargs)
