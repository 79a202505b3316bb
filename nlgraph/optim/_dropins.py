"""The drop-ins: ``compile_optimizer`` applied to the library's graphs.

``SGD``, ``Adam``, ``AdamW``, ``Adagrad``, ``RMSprop`` take torch's signatures and keep its state
layout; ``Muon``, ``M3``, ``DMGD``, ``DeltaMomentum``, ... take the paper's. Torch-style
hyperparameter names are mapped onto the builders' arguments::

    opt = nlgraph.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), amsgrad=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
"""

from __future__ import annotations

from typing import Any

from nlgraph.library import builder as _library
from nlgraph.optim._optimizer import GraphOptimizer, compile_optimizer

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "Adagrad",
    "RMSprop",
    "Momentum",
    "AdagradMomentum",
    "PreconditionedMomentum",
    "DeltaMomentum",
    "DMGD",
    "Muon",
    "M3",
    "DGD",
]


_TORCH = {"maximize": False, "foreach": None}  # foreach: accepted; the step always is


def _sgd_kwargs(g: dict[str, Any]) -> dict[str, Any]:
    if g["dampening"]:
        raise ValueError(
            f"SGD: dampening={g['dampening']} is not supported (torch skips it on the first "
            "step, which no memory update reproduces); use dampening=0"
        )
    return {"lr": g["lr"], "momentum": g["momentum"], "nesterov": g["nesterov"],
            "weight_decay": g["weight_decay"]}  # fmt: skip


def _adamw_part(g: dict[str, Any]) -> dict[str, Any]:
    """The AdamW part of Muon/M3: its lr follows the group's schedule (``lr / initial_lr``)."""
    factor = g["lr"] / g.get("initial_lr", g["lr"]) if g.get("initial_lr") else 1.0
    b1, b2 = g["adamw_betas"]
    return {"adamw_lr": g["adamw_lr"] * factor, "adamw_b1": b1, "adamw_b2": b2,
            "adamw_eps": g["adamw_eps"], "adamw_wd": g["adamw_weight_decay"]}  # fmt: skip


_ADAMW_PART = {"adamw_lr": 3e-4, "adamw_betas": (0.9, 0.95), "adamw_eps": 1e-8,
               "adamw_weight_decay": 0.0}  # fmt: skip

SGD = compile_optimizer(
    _library("sgd"),
    "SGD",
    {
        "lr": 1e-3,
        "momentum": 0.0,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        **_TORCH,
    },  # fmt: skip
    _sgd_kwargs,
    {"b": "momentum_buffer"},
    doc="``torch.optim.SGD`` compiled from the library's ``sgd`` graph (Eqs. 8–13, 33).",
)


def _adam_like(name: str, cls: str, weight_decay: float, wd_arg: str) -> type[GraphOptimizer]:
    """Adam and AdamW share torch's signature; they differ in the decay's default and in which
    builder argument it feeds (coupled L2 ``weight_decay`` vs decoupled ``wd``)."""
    return compile_optimizer(
        _library(name),
        cls,
        {
            "lr": 1e-3,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": weight_decay,
            "amsgrad": False,
            **_TORCH,
        },  # fmt: skip
        lambda g: {
            "lr": g["lr"],
            "b1": g["betas"][0],
            "b2": g["betas"][1],
            "eps": g["eps"],
            wd_arg: g["weight_decay"],
            "amsgrad": g["amsgrad"],
        },  # fmt: skip
        {"m": "exp_avg", "v": "exp_avg_sq", "vmax": "max_exp_avg_sq"},
        doc=f"``torch.optim.{cls}`` compiled from the library's ``{name}`` graph (App. B).",
    )


Adam = _adam_like("adam", "Adam", 0.0, "weight_decay")
AdamW = _adam_like("adamw", "AdamW", 1e-2, "wd")
Adagrad = compile_optimizer(
    _library("adagrad"),
    "Adagrad",
    {
        "lr": 1e-2,
        "lr_decay": 0.0,
        "weight_decay": 0.0,
        "initial_accumulator_value": 0.0,
        "eps": 1e-10,
        **_TORCH,
    },  # fmt: skip
    lambda g: {
        k: g[k] for k in ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")
    },  # fmt: skip
    {"v": "sum"},
    doc="``torch.optim.Adagrad`` compiled from the library's ``adagrad`` graph (App. B); the "
    "state's ``sum`` excludes ``initial_accumulator_value``.",
)
RMSprop = compile_optimizer(
    _library("rmsprop"),
    "RMSprop",
    {
        "lr": 1e-2,
        "alpha": 0.99,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "momentum": 0.0,
        "centered": False,
        **_TORCH,
    },  # fmt: skip
    lambda g: {
        "lr": g["lr"],
        "beta": g["alpha"],
        "eps": g["eps"],
        "momentum": g["momentum"],
        "centered": g["centered"],
        "weight_decay": g["weight_decay"],
    },  # fmt: skip
    {"v": "square_avg", "a": "grad_avg", "b": "momentum_buffer"},
    doc="``torch.optim.RMSprop`` compiled from the library's ``rmsprop`` graph (App. B).",
)
Momentum = compile_optimizer(
    _library("momentum"),
    "Momentum",
    {"lr": 1e-2, "momentum": 0.9},
    lambda g: {"lr": g["lr"], "beta": g["momentum"]},
    doc="The paper's momentum, ``m <- momentum m - lr g``, ``W <- W + m`` (Eqs. 10–13, 33).",
)
AdagradMomentum = compile_optimizer(
    _library("adagrad_momentum"),
    "AdagradMomentum",
    {"lr": 1e-2, "betas": (1.0, 1.0), "eps": 1e-10},
    lambda g: {"lr": g["lr"], "b1": g["betas"][0], "b2": g["betas"][1], "eps": g["eps"]},
    doc="AdaGrad with momentum, the optimal element-wise memory of App. B (Eqs. 100–105).",
)
PreconditionedMomentum = compile_optimizer(
    _library("preconditioned_momentum"),
    "PreconditionedMomentum",
    {"lr": 1e-3, "momentum": 0.9, "beta2": 0.999, "eps": 1e-8},
    lambda g: {"lr": g["lr"], "beta": g["momentum"], "b2": g["beta2"], "eps": g["eps"]},
    doc="Momentum mapping gradients to preconditioned values ``P u`` (Eqs. 46–47).",
)
DeltaMomentum = compile_optimizer(
    _library("delta_momentum"),
    "DeltaMomentum",
    {"lr": 1e-2, "momentum": 0.9, "decay": 0.1, "normalize": False},
    lambda g: {
        "lr": g["lr"],
        "beta": g["momentum"],
        "decay": g["decay"],
        "normalize": g["normalize"],
    },  # fmt: skip
    doc="Delta momentum, ``m <- (momentum I - decay u u^T) m - lr u`` (Eqs. 48–49).",
)
DMGD = compile_optimizer(
    _library("dmgd"),
    "DMGD",
    {"lr": 1e-2, "inner_lr": 1e-2, "decay": 1.0, "width": 16},
    doc="Deep momentum GD: an MLP memory of each tensor's gradient entries (Eq. 50).",
)
Muon = compile_optimizer(
    _library("muon_adamw"),
    "Muon",
    {
        "lr": 2e-2,
        "momentum": 0.95,
        "nesterov": True,
        "ns_steps": 5,
        "variant": "quintic",
        "weight_decay": 0.0,
        **_ADAMW_PART,
    },  # fmt: skip
    lambda g: {
        "lr": g["lr"],
        "beta": g["momentum"],
        "nesterov": g["nesterov"],
        "steps": g["ns_steps"],
        "variant": g["variant"],
        "wd": g["weight_decay"],
        **_adamw_part(g),
    },  # fmt: skip
    doc="Muon on matrices (Eqs. 42–44, 52), AdamW on the rest (``adamw_*``; its lr follows "
    "the group's schedule).",
)
M3 = compile_optimizer(
    _library("m3_adamw"),
    "M3",
    {
        "lr": 1e-3,
        "betas": (0.9, 0.999, 0.9),
        "alpha": 1.0,
        "eps": 1e-8,
        "slow_every": 8,
        "ns_steps": 5,
        "variant": "quintic",
        "momenta": "sum",
        **_ADAMW_PART,
    },  # fmt: skip
    lambda g: {
        "lr": g["lr"],
        "b1": g["betas"][0],
        "b2": g["betas"][1],
        "b3": g["betas"][2],
        "alpha": g["alpha"],
        "eps": g["eps"],
        "f": g["slow_every"],
        "steps": g["ns_steps"],
        "variant": g["variant"],
        "momenta": g["momenta"],
        **_adamw_part(g),
    },  # fmt: skip
    doc="M3 (Algorithm 1) on matrices, AdamW on the rest (``adamw_*``; its lr follows the "
    "group's schedule).",
)
DGD = compile_optimizer(
    _library("dgd_update"),
    "DGD",
    {"lr": 1e-2},
    doc="Delta gradient descent for ``nn.Linear`` weights (Eqs. 56–57); call "
    "``opt.watch(model)`` so that the step sees each layer's inputs.",
)
