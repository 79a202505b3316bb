"""Element-wise operations of flows, shared by the generated program and the cluster windows."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from nlgraph.compiler.modules import ACT

__all__ = ["UNARY", "BINARY"]

UNARY = {
    "neg": torch.neg, "square": torch.square, "sqrt": torch.sqrt, "abs": torch.abs,
    "sign": torch.sign, "exp": torch.exp, "log": torch.log, "softplus": F.softplus, **ACT,
}  # fmt: skip
BINARY = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "pow": lambda a, b: a**b,
}  # fmt: skip
