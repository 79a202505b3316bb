"""Values of an optimizer program: tensor lists with a pending scale, evaluated by foreach ops.

A flow over the gradient stream evaluates to a Python ``float`` or a :class:`Lazy` list: one
tensor per parameter of the bucket, times a scalar that is not applied yet (``scale * a``), or a
product/quotient of two lists that is not formed yet (``scale * a * b``, ``scale * a / b``).
Deferring them is what lets ``-lr * debias(m) / (sqrt(debias(v)) + eps)`` reach the parameters
as one ``_foreach_addcdiv_`` (PAPER.md 2.3, Adam): scalars fold into the last op's ``alpha`` or
``value``, and ``+ eps`` on a fresh temporary is added in place. Every op here is one foreach
call over all tensors of the bucket; Newton–Schulz, per-tensor inner products (``_foreach_mm``)
and the delta-gradient solve are the matrix work per tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from nlgraph._errors import CompileError
from nlgraph.compiler.newton_schulz import orthogonalize_tensor

__all__ = [
    "Lazy",
    "Value",
    "lazy",
    "plain",
    "materialize",
    "neg",
    "add",
    "mul",
    "div",
    "power",
    "unary",
    "add_to",
    "lerp_to",
    "inner",
    "newton_schulz",
    "dgd_step",
    "ACTIVATIONS",
    "elementwise_mlp",
    "mlp_gd_step",
]

Tensors = list[Tensor]


@dataclass
class Lazy:
    """``scale * a`` (``kind="list"``), ``scale * a * b`` (``"mul"``) or ``scale * a / b``
    (``"div"``) over tensor lists; ``owned``: ``a`` is a temporary this program may overwrite."""

    kind: str
    a: Tensors
    b: Tensors | None = None
    scale: float = 1.0
    owned: bool = False


Value = float | Lazy


def _scaled(x: Lazy, scale: float) -> Lazy:
    return Lazy(x.kind, x.a, x.b, scale, x.owned)


def lazy(tensors: Tensors, scale: float = 1.0, owned: bool = False) -> Lazy:
    return Lazy("list", tensors, None, scale, owned)


def plain(x: Lazy) -> tuple[Tensors, float, bool]:
    """``x`` as ``(tensors, scale, owned)``: forms a pending product or quotient."""
    if x.kind == "list":
        return x.a, x.scale, x.owned
    fn = torch._foreach_mul if x.kind == "mul" else torch._foreach_div
    return fn(x.a, x.b), x.scale, True


def materialize(x: Lazy) -> Tensors:
    """The tensors of ``x`` with its scale applied (a fresh list unless nothing is pending)."""
    t, s, owned = plain(x)
    if s == 1.0:
        return t
    if owned:
        torch._foreach_mul_(t, s)
        return t
    return torch._foreach_mul(t, s)


def neg(x: Value) -> Value:
    return -x if isinstance(x, float) else _scaled(x, -x.scale)


def mul(x: Value, y: Value) -> Value:
    if isinstance(x, float) and isinstance(y, float):
        return x * y
    if isinstance(x, float):
        return _scaled(y, x * y.scale)
    if isinstance(y, float):
        return _scaled(x, x.scale * y)
    (a, sa, _), (b, sb, _) = plain(x), plain(y)
    return Lazy("mul", a, b, sa * sb)


def div(x: Value, y: Value) -> Value:
    if isinstance(x, float) and isinstance(y, float):
        return x / y
    if isinstance(y, float):
        return _scaled(x, x.scale / y)
    b, sb, owned = plain(y)
    if isinstance(x, float):
        if owned:
            torch._foreach_reciprocal_(b)
            return lazy(b, x / sb, owned=True)
        return lazy(torch._foreach_reciprocal(b), x / sb, owned=True)
    a, sa, _ = plain(x)
    return Lazy("div", a, b, sa / sb)


def add(x: Value, y: Value) -> Value:
    if isinstance(x, float) and isinstance(y, float):
        return x + y
    if isinstance(x, float):
        x, y = y, x
    if isinstance(y, float):  # s a + c = s (a + c / s), in place on a temporary
        t, s, owned = plain(x)
        if s == 0.0:
            return lazy(torch._foreach_add(torch._foreach_mul(t, 0.0), y), owned=True)
        if owned:
            torch._foreach_add_(t, y / s)
            return lazy(t, s, owned=True)
        return lazy(torch._foreach_add(t, y / s), s, owned=True)
    if x.kind != "list" and y.kind == "list":
        x, y = y, x
    t, s, owned = plain(x)
    if s == 0.0:
        return y
    ops = {
        "list": (torch._foreach_add_, torch._foreach_add),
        "mul": (torch._foreach_addcmul_, torch._foreach_addcmul),
        "div": (torch._foreach_addcdiv_, torch._foreach_addcdiv),
    }[y.kind]
    args = (y.a,) if y.kind == "list" else (y.a, y.b)
    key = "alpha" if y.kind == "list" else "value"
    if owned:
        ops[0](t, *args, **{key: y.scale / s})
        return lazy(t, s, owned=True)
    return lazy(ops[1](t, *args, **{key: y.scale / s}), s, owned=True)


def power(x: Value, p: Value) -> Value:
    if isinstance(x, float) and isinstance(p, float):
        return x**p
    if not isinstance(p, float) or isinstance(x, float):
        raise CompileError("x ** p in an optimizer graph needs a tensor x and a constant p")
    if p == 2.0:
        return mul(x, x)
    if p == 0.5:
        return unary("sqrt", x)
    t, s, owned = plain(x)
    if s <= 0:
        t, s, owned = materialize(x), 1.0, True
    if owned:
        torch._foreach_pow_(t, p)
        return lazy(t, s**p, owned=True)
    return lazy(torch._foreach_pow(t, p), s**p, owned=True)


_ELEMENTWISE = ("sqrt", "abs", "exp", "log", "sign", "sigmoid", "tanh")
_SCALE_FREE = {  # f(s a) = g(s) f(a) for s > 0
    "sqrt": math.sqrt,
    "abs": abs,
    "relu": lambda s: s,
}


def unary(fn: str, x: Value) -> Value:
    """An element-wise function; ``neg``, ``square`` and positive scales stay pending."""
    if isinstance(x, float):
        out = unary(fn, lazy([torch.tensor(x, dtype=torch.float64)]))
        return float(materialize(out)[0])
    if fn == "neg":
        return neg(x)
    if fn == "square":
        return mul(x, x)
    if fn == "normalize":  # a / ||a|| per tensor: the flattened key of delta momentum
        t = materialize(x)
        norms = torch.stack(torch._foreach_norm(t)).clamp_min(1e-12).reciprocal()
        return lazy(torch._foreach_mul(t, norms.tolist()), owned=True)
    t, s, owned = plain(x)
    if fn in _SCALE_FREE and s > 0:
        scale = _SCALE_FREE[fn](s)
    else:
        t, scale, owned = materialize(x), 1.0, x.kind != "list" or x.scale != 1.0 or x.owned
    if fn in _ELEMENTWISE:
        if owned:
            getattr(torch, f"_foreach_{fn}_")(t)
            return lazy(t, scale, owned=True)
        return lazy(getattr(torch, f"_foreach_{fn}")(t), scale, owned=True)
    if fn == "relu":
        if owned:
            torch._foreach_clamp_min_(t, 0.0)
            return lazy(t, scale, owned=True)
        return lazy(torch._foreach_clamp_min(t, 0.0), scale, owned=True)
    if fn == "silu":
        return lazy(torch._foreach_mul(t, torch._foreach_sigmoid(t)), owned=True)
    if fn == "softplus":
        return lazy([torch.nn.functional.softplus(a) for a in t], owned=True)
    raise CompileError(f"element-wise function {fn!r} is not supported in an optimizer graph")


# ------------------------------------------------------------------------------- consumers


def add_to(s: Tensors, x: Value, alpha: float = 1.0) -> None:
    """``S += alpha * x`` in one foreach op (``addcmul_``/``addcdiv_`` for pending products)."""
    if isinstance(x, float):
        torch._foreach_add_(s, alpha * x)
    elif x.kind == "list":
        torch._foreach_add_(s, x.a, alpha=alpha * x.scale)
    elif x.kind == "mul":
        torch._foreach_addcmul_(s, x.a, x.b, value=alpha * x.scale)
    else:
        torch._foreach_addcdiv_(s, x.a, x.b, value=alpha * x.scale)


def lerp_to(s: Tensors, x: Value, weight: float) -> None:
    """``S <- S + weight (x - S)``: an EMA step, ``_foreach_lerp_`` when ``x`` is a plain list."""
    if isinstance(x, Lazy) and x.kind == "list" and x.scale == 1.0:
        torch._foreach_lerp_(s, x.a, weight)
        return
    torch._foreach_mul_(s, 1.0 - weight)
    add_to(s, x, weight)


def inner(a: Tensors, b: Tensors) -> list[float]:
    """``<a_i, b_i>`` over all entries of each tensor pair: one batched ``_foreach_mm``."""
    rows = [t.reshape(1, -1) for t in a]
    cols = [t.reshape(-1, 1) for t in b]
    return torch.cat([r.reshape(1) for r in torch._foreach_mm(rows, cols)]).tolist()


# --------------------------------------------------------------------------- matrix work


def newton_schulz(x: Tensor, steps: int, variant: str, prenorm: bool = True) -> Tensor:
    """One parameter orthogonalised towards its polar factor (PAPER.md 2.5, Eqs. 42–44):
    :func:`nlgraph.compiler.newton_schulz.orthogonalize_tensor`."""
    return orthogonalize_tensor(x, steps, variant, prenorm)


def dgd_step(w: Tensor, b: Tensor, keys: Tensor, lr: float, exact: bool) -> None:
    """One delta-gradient step on a linear layer ``y = W x`` (PAPER.md 3.1, Eqs. 56–57), in place.

    ``b = W - lr grad`` (the plain GD step) and ``keys: [N, d_in]`` the layer's inputs of the
    step, over which the outer loss averages. ``exact``: the minimiser of
    ``1/N sum_n 1/2 ||W x_n - u_n||^2 + 1/(2 lr) ||W - W_t||^2`` with ``u_n`` the per-row
    negative output gradients, ``W = b (I + lr/N X^T X)^{-1}`` — for one row
    ``W_t (I - lr' x x^T) - lr' grad`` with ``lr' = lr / (1 + lr ||x||^2)``. Else the printed
    form ``W_t (I - lr/N X^T X) - lr grad`` (Eq. 88 as printed).
    """
    n, d_in = keys.shape
    x = keys.to(w.dtype)
    c = lr / n
    if not exact:
        w.copy_(b - c * (w @ x.T) @ x)
        return
    if n < d_in:  # Woodbury: (I + c X^T X)^{-1} = I - c X^T (I + c X X^T)^{-1} X
        small = torch.eye(n, dtype=w.dtype, device=w.device) + c * (x @ x.T)
        w.copy_(b - c * (b @ x.T) @ torch.linalg.solve(small, x))
    else:
        big = torch.eye(d_in, dtype=w.dtype, device=w.device) + c * (x.T @ x)
        w.copy_(torch.linalg.solve(big, b.T).T)


# ----------------------------------------------------------- MLP memories of gradient entries

ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda z: z,
}


def elementwise_mlp(layers: Tensors, xs: Tensors, activation: str, residual: bool) -> Tensor:
    """``M_i(x)`` for every entry of every tensor ``x_i``, each tensor with its own MLP (Eq. 89,
    ``M(z) = [z +] W1 s(W2 ... s(WL z))``; ``layers[j]: [P, out, in]`` stacks tensor i's
    ``W{j+1}``). Returns the entries flattened and concatenated: one batched pass, no loop."""
    flat = torch.cat([x.reshape(-1) for x in xs])
    sizes = torch.tensor([x.numel() for x in xs], device=flat.device)
    seg = torch.repeat_interleave(torch.arange(len(xs), device=flat.device), sizes)
    h = flat[:, None]
    for i, w in enumerate(reversed(layers)):  # W_L first, W1 last
        h = torch.einsum("noi,ni->no", w[seg], h)
        if i < len(layers) - 1:
            h = ACTIVATIONS[activation](h)
    return h[:, 0] + flat if residual else h[:, 0]


def mlp_gd_step(
    layers: Tensors,
    keys: Tensors,
    values: Tensors,
    activation: str,
    residual: bool,
    lr: float,
    retain: float,
) -> Tensors:
    """One GD step with retention on ``1/2 mean ||M_i(k) - v||^2`` over each tensor's entries
    (a mean, so that ``lr`` does not grow with the tensor's size); returns the new layers."""
    leaves = [w.detach().requires_grad_() for w in layers]
    sizes = [k.numel() for k in keys]
    with torch.enable_grad():
        r = elementwise_mlp(leaves, keys, activation, residual)
        r = r - torch.cat([v.reshape(-1) for v in values])
        weight = torch.cat([torch.full((n,), 0.5 / n, dtype=r.dtype) for n in sizes])
        grads = torch.autograd.grad((weight.to(r.device) * r * r).sum(), leaves)
    return [w.detach() * retain - lr * g for w, g in zip(leaves, grads, strict=True)]
