"""The public surface is explicit and pinned (STYLE.md 12); the examples run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nlgraph as nl

ROOT = Path(__file__).resolve().parents[1]

PUBLIC = {
    "NLGraphError", "SpecError", "SpecFieldError", "SchemaVersionError", "CompileError",
    "BackendUnavailableError",
    "NumericalFaultError", "ReferenceLoopWarning", "Graph", "GraphSpec", "Level", "LevelHandle",
    "SCHEMA_VERSION",
    "validate", "Frequency", "Reset", "every", "per_token", "per_chunk", "per_sequence",
    "per_step", "frozen", "reset_per_sequence", "reset_never", "reset_every", "reset_with",
    "zeros", "normal", "identity", "meta", "from_path", "params", "like", "tensor", "linear",
    "mlp", "conv", "module", "nonparametric", "state", "read", "grad_of", "const", "debias",
    "newton_schulz", "kv", "dot", "l2", "lp", "l2_to", "nadaraya_watson", "outer", "custom",
    "gd", "dgd", "ema", "precondition", "orthogonalize", "weight_decay", "follow", "exact",
    "chain", "learned", "signal", "stop_grad", "truncated", "unrolled", "to_dict", "from_dict",
    "to_json", "from_json", "to_yaml", "from_yaml", "load", "save", "__version__",
}  # fmt: skip


def test_public_api_is_pinned():
    assert set(nl.__all__) == PUBLIC
    for name in nl.__all__:
        assert hasattr(nl, name), name


def test_error_tree():
    for cls in (nl.SpecError, nl.CompileError, nl.BackendUnavailableError, nl.SchemaVersionError):
        assert issubclass(cls, nl.NLGraphError)
    assert issubclass(nl.SpecFieldError, nl.SpecError)


def test_a_bad_field_of_a_dsl_constructor_is_a_spec_error():
    """One line naming the object, the field, what was received and what is allowed; never
    pydantic's own error (which links to its website)."""
    import pydantic
    import pytest

    cases = [
        (lambda: nl.signal(nl.const(1.0), act="tanh"), "Signal: act", "'sigmoid'"),
        (lambda: nl.mlp(4, 4, width=4, depth="x"), "MLP: depth", "'x'"),
        (lambda: nl.every(0, "token"), "Frequency: every", "0"),
        (lambda: nl.gd(lr=0.1, nesterov="maybe"), "GD: nesterov", "'maybe'"),
    ]
    for build, where, received in cases:
        with pytest.raises(nl.SpecFieldError) as info:
            build()
        assert not isinstance(info.value, pydantic.ValidationError)
        text = str(info.value)
        assert text.startswith(where) and received in text and "\n" not in text, text
        assert "pydantic.dev" not in text


def test_py_typed_ships():
    assert (ROOT / "nlgraph" / "py.typed").exists()


def test_declare_example_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "declare_a_learner.py"), str(tmp_path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert "tier 1: M (every token)" in out.stdout
    assert (
        nl.load(tmp_path / "delta_memory_with_momentum.yaml").name == "delta_memory_with_momentum"
    )
