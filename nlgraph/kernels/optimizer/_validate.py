"""Argument checks shared by every backend of ``optimizer_update`` (done before any work)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

RULES = ("sgd", "adam", "rmsprop")


@dataclass(frozen=True)
class Hyper:
    """One step's hyperparameters, checked."""

    rule: str
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    dampening: float
    nesterov: bool
    amsgrad: bool
    step: int


def check(
    param: Tensor,
    grad: Tensor,
    m: Tensor | None,
    v: Tensor | None,
    vmax: Tensor | None,
    spans: Tensor,
    rule: str,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    dampening: float,
    nesterov: bool,
    amsgrad: bool,
    step: int,
) -> Hyper:
    where = "optimizer_update"
    if rule not in RULES:
        raise ValueError(f"{where}: rule {rule!r} is not one of {RULES}")
    if param.ndim != 1 or not param.is_contiguous():
        raise ValueError(
            f"{where}: param must be a flat contiguous buffer, got shape {tuple(param.shape)} "
            f"and strides {param.stride()}; pack the tensors with FlatParams"
        )
    need = {
        "m": rule == "adam" or beta1 != 0.0,
        "v": rule != "sgd",
        "vmax": amsgrad,
    }
    for name, t in (("grad", grad), ("m", m), ("v", v), ("vmax", vmax)):
        if t is None:
            if need.get(name, True):
                raise ValueError(f"{where}: rule {rule!r} with these settings needs {name}")
            continue
        if t.shape != param.shape or t.device != param.device or not t.is_contiguous():
            raise ValueError(
                f"{where}: {name} must be contiguous with param's shape {tuple(param.shape)} "
                f"on {param.device}, got {tuple(t.shape)} on {t.device}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{where}: {name} must be floating point, got {t.dtype}")
    if spans.dtype != torch.int64 or spans.ndim != 2 or spans.shape[1] != 2:
        raise ValueError(
            f"{where}: spans must be an int64 [S, 2] tensor of (start, stop), got "
            f"{spans.dtype} {tuple(spans.shape)}"
        )
    if spans.device.type != "cpu":
        raise ValueError(
            f"{where}: spans live on the CPU (they size the launch), got {spans.device}"
        )
    if spans.numel():
        lo, hi = int(spans[:, 0].min()), int(spans[:, 1].max())
        if lo < 0 or hi > param.numel() or bool((spans[:, 1] < spans[:, 0]).any()):
            raise ValueError(f"{where}: spans must satisfy 0 <= start <= stop <= {param.numel()}")
    if amsgrad and rule != "adam":
        raise ValueError(f"{where}: amsgrad applies to rule 'adam' only, got {rule!r}")
    if nesterov and (rule != "sgd" or beta1 <= 0.0 or dampening != 0.0):
        raise ValueError(f"{where}: nesterov needs rule 'sgd', beta1 > 0 and dampening 0")
    if rule == "adam" and not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"{where}: Adam's betas must lie in [0, 1), got {beta1}, {beta2}")
    if int(step) < 1:
        raise ValueError(f"{where}: step counts this update, so it is >= 1; got {step}")
    floats = (float(lr), float(beta1), float(beta2), float(eps), float(weight_decay))
    return Hyper(rule, *floats, bool(decoupled), float(dampening), bool(nesterov),
                 bool(amsgrad), int(step))  # fmt: skip
