"""Build what each planned level owns: slow modules, the initial states and learned scalars of
fast memories, and the initial parameters of CMS blocks.

:class:`~nlgraph.compiler.runtime.CompiledLearner` calls :func:`build_levels` in the plan's
order (so random initialisation is the same for a given seed whatever the lowerings), then
hands the pieces to the lowering modules (:mod:`nlgraph.compiler.lowerings`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from nlgraph._errors import CompileError
from nlgraph._resolve import resolve
from nlgraph.compiler.modules import build_slow, dim
from nlgraph.compiler.plan import Plan
from nlgraph.level import Level
from nlgraph.optimizers import Learned

__all__ = ["Built", "build_levels", "inverse_bound"]


@dataclass
class Built:
    """What :func:`build_levels` made, by level name."""

    slow: dict[str, nn.Module] = field(default_factory=dict)
    initial: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # memories
    meta: set[str] = field(default_factory=set)  # memories whose initial state is learned
    blocks: dict[str, nn.Module] = field(default_factory=dict)  # CMS blocks' initial modules
    scalars: dict[str, dict[str, float]] = field(default_factory=dict)  # raw, by field


def build_levels(plan: Plan) -> Built:
    """Every level's parameters, in the plan's forward order."""
    out = Built()
    for name in plan.order:
        lv = plan.spec.level(name)
        lowering = plan.levels[name].lowering
        if lowering == "parameter":
            mod = build_slow(lv, plan.dims)
            if lv.frequency.unit == "never":  # frozen: no optimizer ever moves it
                mod.requires_grad_(False)
            out.slow[name] = mod
            continue
        out.scalars[name] = _learned_scalars(lv)
        if lowering == "boundary":
            out.blocks[name] = _block(lv, plan)
            continue
        if lv.init.kind == "path":
            raise CompileError(f"level {lv.name!r}: init from path is not supported for memories")
        if lowering == "attention":
            continue
        out.initial[name] = {
            w: _init_tensor(lv, shape, fan_in) for w, (shape, fan_in) in _shapes(lv, plan).items()
        }
        if lv.init.kind == "meta":
            out.meta.add(name)
    return out


def _block(lv: Level, plan: Plan) -> nn.Module:
    if lv.effective_reset().kind == "every":
        raise CompileError(f"level {lv.name!r}: reset_every is not supported for blocks")
    block = build_slow(lv, plan.dims)
    if lv.init.kind == "path":
        _load_pretrained(block, lv)
    block.requires_grad_(lv.init.kind == "meta")  # meta: learned by the outer loop
    return block


def _heads(lv: Level, plan: Plan) -> tuple[int, int, int]:
    where = f"level {lv.name!r}"
    st = lv.state
    d_in, d_out = dim(st.d_in, plan.dims, where), dim(st.d_out, plan.dims, where)
    if d_in % lv.heads or d_out % lv.heads:
        raise CompileError(f"{where}: widths {d_in}, {d_out} not divisible by {lv.heads} heads")
    return lv.heads, d_in // lv.heads, d_out // lv.heads


def _shapes(lv: Level, plan: Plan) -> dict[str, tuple[tuple[int, ...], int]]:
    """Each initial tensor's ``(shape, fan_in)``: ``M: [H, dv, dk]`` for a linear memory; for
    an MLP memory ``W1`` (the output layer, Eq. 89 order) ... ``WL`` (the first)."""
    H, dk, dv = _heads(lv, plan)
    if plan.levels[lv.name].lowering == "linear_memory":
        return {"M": ((H, dv, dk), dk)}
    st = lv.state
    if st.kind == "linear":
        return {"W1": ((H, dv, dk), dk)}
    width = dim(st.width, plan.dims, f"level {lv.name!r}")
    sizes = [dk] + [width] * (st.depth - 1) + [dv]
    return {f"W{st.depth - i}": ((H, sizes[i + 1], sizes[i]), sizes[i]) for i in range(st.depth)}


def _init_tensor(lv: Level, shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    if lv.init.kind in ("zeros", "default"):  # an empty memory
        return torch.zeros(shape)
    if lv.init.kind == "identity":
        eye = torch.eye(shape[-2], shape[-1])
        return eye.expand(shape).clone()
    std = lv.init.std if lv.init.kind == "normal" else 1.0 / math.sqrt(fan_in)
    return torch.randn(shape) * std


def _learned_scalars(lv: Level) -> dict[str, float]:
    """The raw initial value of each learned scalar of the level's rules, by field."""
    out: dict[str, float] = {}
    for rule in lv.optimizer:
        for sname in ("lr", "momentum", "retain", "beta", "rate"):
            value = getattr(rule, sname, None)
            if isinstance(value, Learned):
                if sname in out:
                    raise CompileError(
                        f"level {lv.name!r}: two rules learn a {sname!r}; learned scalars "
                        "are named by level and field, so give one of them a constant"
                    )
                out[sname] = inverse_bound(value)
    return out


def _load_pretrained(block: nn.Module, lv: Level) -> None:
    """Ad-hoc level stacking (PAPER.md 5.5): copy a pre-trained MLP's linear layers, in order,
    into the block. The import path names an ``nn.Module`` or a callable returning one."""
    where = f"level {lv.name!r}, init {lv.init.path}"
    src = resolve(lv.init.path)
    src = src() if callable(src) and not isinstance(src, nn.Module) else src
    if not isinstance(src, nn.Module):
        raise CompileError(f"{where}: expected an nn.Module, got {type(src).__name__}")
    mine = [m for m in block.modules() if isinstance(m, nn.Linear)]
    theirs = [m for m in src.modules() if isinstance(m, nn.Linear)]
    want = [tuple(m.weight.shape) for m in mine]
    got = [tuple(m.weight.shape) for m in theirs]
    if want != got:
        raise CompileError(f"{where}: its linear layers {got} do not match the block's {want}")
    with torch.no_grad():
        for a, b in zip(mine, theirs, strict=True):
            a.weight.copy_(b.weight)
            if a.bias is not None:
                a.bias.copy_(b.bias) if b.bias is not None else a.bias.zero_()


def inverse_bound(value: Learned) -> float:
    """The raw parameter whose bounded value (sigmoid into ``[lo, hi]``, softplus above
    ``lo``) is ``value.init``."""
    lo, hi, x = value.lo, value.hi, value.init
    if lo is not None and hi is not None:
        p = min(max((x - lo) / (hi - lo), 1e-6), 1 - 1e-6)
        return math.log(p / (1 - p))
    if lo is not None:
        y = max(x - lo, 1e-6)
        return y + math.log(-math.expm1(-y))
    return x
