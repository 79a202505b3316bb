"""``nn.Module``s for slow levels (read in parallel over a whole sequence) and for the
meta-learned initial states of fast memories."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from nlgraph._errors import CompileError
from nlgraph._resolve import resolve
from nlgraph.level import Level

__all__ = ["ACT", "CausalConv", "MLPBlock", "build_slow", "dim"]

ACT = {
    "silu": F.silu, "gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh,
    "sigmoid": torch.sigmoid, "identity": lambda x: x,
}  # fmt: skip


def dim(value: int | str, dims: dict[str, int], where: str) -> int:
    if isinstance(value, int):
        return value
    if value not in dims:
        raise CompileError(f"{where}: symbolic width {value!r} is not bound; pass {value}=<int>")
    return dims[value]


class CausalConv(nn.Module):
    """Depthwise causal convolution over time, ``[B, T, D] -> [B, T, D]`` (window taps; the
    output at t sees inputs t-window+1 .. t only)."""

    def __init__(self, d: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.weight = nn.Parameter(torch.zeros(d, 1, window))
        with torch.no_grad():
            self.weight[:, 0, -1] = 1.0  # start as the identity
            self.weight.add_(torch.randn_like(self.weight) * 0.02)

    def forward(
        self, x: torch.Tensor, tail: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: [B, T, D]``; ``tail``: the last ``window - 1`` inputs of the previous segment
        (zeros at a sequence start). Returns the output and the new tail (the conv's state)."""
        if tail is None:
            tail = x.new_zeros(x.shape[0], self.window - 1, x.shape[-1])
        h = torch.cat([tail, x], dim=1)
        y = F.conv1d(h.transpose(1, 2), self.weight, groups=x.shape[-1]).transpose(1, 2)
        return y, h[:, h.shape[1] - (self.window - 1) :]


class MLPBlock(nn.Module):
    """``depth`` linear layers with an activation between them, optional residual."""

    def __init__(self, d_in: int, d_out: int, width: int, depth: int, act: str, residual: bool):
        super().__init__()
        sizes = [d_in] + [width] * (depth - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False))
        self.act, self.act_name = ACT[act], act
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return x + h if self.residual else h


def _init_linear(layer: nn.Linear, lv: Level) -> None:
    init = lv.init
    with torch.no_grad():
        if init.kind == "zeros":
            layer.weight.zero_()
        elif init.kind == "normal":
            layer.weight.normal_(0.0, init.std)
        elif init.kind == "identity":
            layer.weight.copy_(torch.eye(*layer.weight.shape))
        if layer.bias is not None:
            layer.bias.zero_()


def build_slow(lv: Level, dims: dict[str, int]) -> nn.Module:
    """The module of a slow level (projection, convolution, MLP, user module)."""
    st = lv.state
    where = f"level {lv.name!r}"
    if st.kind == "linear":
        layer = nn.Linear(dim(st.d_in, dims, where), dim(st.d_out, dims, where), bias=st.bias)
        if lv.init.kind in ("zeros", "normal", "identity"):
            _init_linear(layer, lv)
        return layer
    if st.kind == "conv":
        return CausalConv(dim(st.dim, dims, where), st.window)
    if st.kind == "mlp":
        d_in, d_out = dim(st.d_in, dims, where), dim(st.d_out, dims, where)
        return MLPBlock(d_in, d_out, dim(st.width, dims, where), st.depth, st.activation,
                        st.residual)  # fmt: skip
    if st.kind == "module":
        cls = resolve(st.path)
        try:
            mod = cls(**st.kwargs)
        except Exception as err:  # user code: report it with the level and path
            raise CompileError(f"{where}: building {st.path}(**{st.kwargs}) failed: {err}") from err
        if not isinstance(mod, nn.Module):
            raise CompileError(f"{where}: {st.path} built a {type(mod).__name__}, not nn.Module")
        return mod
    if st.kind == "tensor":
        shape = [dim(d, dims, where) for d in st.shape]
        std = getattr(lv.init, "std", 1 / math.sqrt(shape[-1]))
        p = nn.Parameter(
            torch.zeros(shape) if lv.init.kind in ("zeros", "default") else torch.randn(shape) * std
        )
        holder = nn.Module()
        holder.value = p
        return holder
    raise CompileError(f"{where}: no module for state {st}")
