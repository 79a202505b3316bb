"""Pack a param group into one flat buffer so that one kernel launch updates all of it.

Layout: each parameter owns a *slot* of ``numel`` elements rounded up to ``align`` (64), at an
offset that is a multiple of ``align``; ``p.data`` becomes a view of its slot (same shape,
contiguous strides). The gradient and every state buffer (``exp_avg``, ...) have the same
layout, so the update of parameter ``i`` reads ``[offset_i, offset_i + slot_i)`` of each. The
padding is zero in every buffer when packed and is updated with the slots (the span of a slot
includes its padding, so that GPU loads are whole 16-byte vectors): with ``eps = 0`` Adam turns
it into NaN, which no parameter ever reads.

Gradients are *gathered*: at each step a gradient that is not already the view of its slot is
copied in (one ``_foreach_copy_``), then ``p.grad`` is pointed at the slot. So a loop that zeros
gradients in place (``zero_grad(set_to_none=False)``) has autograd accumulate straight into the
flat buffer and the copy disappears; the default ``set_to_none=True`` pays one copy of the
gradients per step. Parameters without a gradient this step are left out of the step's spans:
their slots are not read or written.

State: a parameter's entry ``state[key]`` is the view of its slot in the flat buffer of ``key``,
so ``optimizer.state_dict()`` keeps torch's per-parameter layout. An entry that is not the view
(a new state, one loaded by ``load_state_dict``) is copied into the slot and replaced by the
view the next time the parameter steps (:meth:`FlatParams.adopt`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["FlatParams"]


class FlatParams:
    """A list of parameters (one device, one dtype) packed into flat buffers.

    Args:
        params: the tensors; their ``.data`` become views into :attr:`param`.
        keys: names of the state buffers laid out like the parameters (e.g. ``("exp_avg",
            "exp_avg_sq")``); each gets a zero flat buffer.
        align: slot alignment in elements.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.zeros(5))
        >>> flat = FlatParams([a, b], ("exp_avg",))
        >>> flat.param.shape, a.data_ptr() == flat.param.data_ptr()
        (torch.Size([128]), True)
        >>> flat.spans([1]).tolist()
        [[64, 128]]
    """

    def __init__(self, params: Sequence[Tensor], keys: Iterable[str] = (), align: int = 64):
        if not params:
            raise ValueError("FlatParams needs at least one parameter")
        p0 = params[0]
        for p in params:
            if p.device != p0.device or p.dtype != p0.dtype or p.layout != torch.strided:
                raise ValueError(
                    f"FlatParams packs dense tensors of one device and dtype; got {p.dtype} on "
                    f"{p.device} next to {p0.dtype} on {p0.device}"
                )
        self.params = list(params)
        self.keys = tuple(keys)
        sizes = [p.numel() for p in self.params]
        slots = [-(-n // align) * align for n in sizes]
        self.offsets = [sum(slots[:i]) for i in range(len(slots))]
        self.sizes, self.slots = sizes, slots
        total = sum(slots)
        kw: dict[str, Any] = {"dtype": p0.dtype, "device": p0.device}
        self.param = torch.zeros(total, **kw)
        self.grad = torch.zeros(total, **kw)
        self.state = {k: torch.zeros(total, **kw) for k in self.keys}
        self._index = {p: i for i, p in enumerate(self.params)}
        with torch.no_grad():
            views = self._views(self.param)
            torch._foreach_copy_(views, [p.detach() for p in self.params])
            for p, view in zip(self.params, views, strict=True):
                p.data = view
        self._grads = self._views(self.grad)
        self._state_views = {k: self._views(t) for k, t in self.state.items()}
        self._ptrs = [p.data_ptr() for p in self.params]
        self._spans: dict[tuple[int, ...], Tensor] = {}

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [
            flat[o : o + n].view(p.shape)
            for p, o, n in zip(self.params, self.offsets, self.sizes, strict=True)
        ]

    def holds(self, params: Sequence[Tensor]) -> bool:
        """Whether these are the packed parameters, in order, still viewing the buffer (a
        ``p.data = ...`` or ``module.to(...)`` since packing breaks it: pack again)."""
        return (
            len(params) == len(self.params)
            and all(p is q for p, q in zip(params, self.params, strict=True))
            and all(p.data_ptr() == ptr for p, ptr in zip(self.params, self._ptrs, strict=True))
        )

    def indices(self, params: Iterable[Tensor]) -> list[int]:
        return [self._index[p] for p in params]

    @torch.no_grad()
    def gather(self, idx: Sequence[int], grads: Sequence[Tensor]) -> None:
        """Bring the gradients of parameters ``idx`` into the flat gradient buffer."""
        dst, src, repoint = [], [], []
        for i, g in zip(idx, grads, strict=True):
            view = self._grads[i]
            if g.data_ptr() == view.data_ptr() and g.stride() == view.stride():
                continue  # autograd accumulated into the slot already
            dst.append(view)
            src.append(g)
            if g is self.params[i].grad:
                repoint.append(i)
        if dst:
            torch._foreach_copy_(dst, src)
        for i in repoint:  # the next backward accumulates in place if grads are zeroed in place
            self.params[i].grad = self._grads[i]

    @torch.no_grad()
    def adopt(self, idx: Sequence[int], states: Sequence[dict[str, Any]]) -> None:
        """Make ``states[j][key]`` the slot view of parameter ``idx[j]`` for every key, copying
        in what the state held (a fresh zero state, or one ``load_state_dict`` put there)."""
        for key, views in self._state_views.items():
            for i, state in zip(idx, states, strict=True):
                held, view = state.get(key), views[i]
                if held is view:
                    continue
                if held is None:
                    view.zero_()
                else:
                    view.copy_(held)
                state[key] = view

    def spans(self, idx: Sequence[int]) -> Tensor:
        """int64 ``[S, 2]`` (CPU) slot ranges of parameters ``idx``, padding included."""
        key = tuple(idx)
        out = self._spans.get(key)
        if out is None:
            rows = [(self.offsets[i], self.offsets[i] + self.slots[i]) for i in key]
            out = torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)
            if len(self._spans) < 256:
                self._spans[key] = out
        return out
