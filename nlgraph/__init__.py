"""nlgraph: Nested Learning as executable graphs of levels.

The spec layer (this package's top level) is pure data and imports no torch: declare a learner
as a :class:`Graph` of levels, validate it, save it as JSON/YAML, draw it. The compiler
(:mod:`nlgraph.compiler`) and kernels (:mod:`nlgraph.kernels`) import torch.
"""

from __future__ import annotations

from nlgraph._errors import (
    BackendUnavailableError,
    CompileError,
    NLGraphError,
    NumericalFaultError,
    ReferenceLoopWarning,
    SchemaVersionError,
    SpecError,
    SpecFieldError,
    SpecTypeError,
)
from nlgraph.clock import (
    Frequency,
    Reset,
    every,
    from_path,
    frozen,
    identity,
    meta,
    normal,
    per_chunk,
    per_sequence,
    per_step,
    per_token,
    reset_every,
    reset_never,
    reset_per_sequence,
    reset_with,
    zeros,
)
from nlgraph.flows import const, debias, grad_of, kv, newton_schulz, read, state
from nlgraph.graph import Graph, LevelHandle
from nlgraph.hyper import substitute, trace
from nlgraph.level import SCHEMA_VERSION, GraphSpec, Level, stop_grad, truncated, unrolled
from nlgraph.objectives import custom, dot, l2, l2_to, lp, nadaraya_watson, outer
from nlgraph.optimizers import (
    chain,
    dgd,
    ema,
    exact,
    follow,
    gd,
    learned,
    orthogonalize,
    precondition,
    signal,
    weight_decay,
)
from nlgraph.serialize import from_dict, from_json, from_yaml, load, save, to_dict, to_json, to_yaml
from nlgraph.states import conv, like, linear, mlp, module, nonparametric, params, tensor
from nlgraph.validation import validate

__version__ = "0.1.0"

__all__ = [
    # errors
    "NLGraphError", "SpecError", "SpecFieldError", "SpecTypeError", "SchemaVersionError",
    "CompileError",
    "BackendUnavailableError", "NumericalFaultError", "ReferenceLoopWarning",
    # graph
    "Graph", "GraphSpec", "Level", "LevelHandle", "SCHEMA_VERSION", "validate",
    # clock, init, reset
    "Frequency", "Reset", "every", "per_token", "per_chunk", "per_sequence", "per_step", "frozen",
    "reset_per_sequence", "reset_never", "reset_every", "reset_with",
    "zeros", "normal", "identity", "meta", "from_path",
    # state
    "params", "like", "tensor", "linear", "mlp", "conv", "module", "nonparametric",
    # flows
    "state", "read", "grad_of", "const", "debias", "newton_schulz", "kv",
    # objectives
    "dot", "l2", "lp", "l2_to", "nadaraya_watson", "outer", "custom",
    # optimizers
    "gd", "dgd", "ema", "precondition", "orthogonalize", "weight_decay", "follow", "exact",
    "chain", "learned", "signal",
    # differentiation
    "stop_grad", "truncated", "unrolled",
    # serialization
    "to_dict", "from_dict", "to_json", "from_json", "to_yaml", "from_yaml", "load", "save",
    # symbolic hyperparameters
    "trace", "substitute",
    "__version__",
]  # fmt: skip
