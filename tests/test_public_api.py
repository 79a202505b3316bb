"""The public surface is explicit and pinned (STYLE.md 12); the examples run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nlgraph as nl

ROOT = Path(__file__).resolve().parents[1]

PUBLIC = {
    "NLGraphError", "SpecError", "SpecFieldError", "SpecTypeError", "SchemaVersionError",
    "CompileError",
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
    "to_json", "from_json", "to_yaml", "from_yaml", "load", "save", "trace", "substitute",
    "__version__",
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
    folder = tmp_path / "not" / "there" / "yet"  # the example makes its output folder
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "declare_a_learner.py"), str(folder)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert "tier 1: M (every token)" in out.stdout
    assert nl.load(folder / "delta_memory_with_momentum.yaml").name == "delta_memory_with_momentum"


def test_a_loaded_file_keeps_the_path_to_a_bad_field(tmp_path):
    """Loading a file validates nested data without calling the classes: its errors name the
    level and the path to the field (not a chain of per-class errors)."""
    import json

    import pytest

    from nlgraph.library import get

    data = nl.to_dict(get("deltanet", d=8))
    for bad, want in (('"act": "tanh"', "act: Input should be"), ('"scale": NaN', "finite")):
        text = json.dumps(data).replace(bad.replace("tanh", "sigmoid").replace("NaN", "1.0"),
                                        bad, 1)  # fmt: skip
        path = tmp_path / "bad.json"
        path.write_text(text)
        with pytest.raises(nl.SpecError) as info:
            nl.load(path)
        msg = str(info.value)
        assert "level 'M' > optimizer > 0 > gd > lr" in msg and want in msg, msg
        assert "Value error" not in msg


def test_every_number_of_a_spec_is_finite():
    import pytest

    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(nl.SpecFieldError, match="finite"):
            nl.gd(lr=value)
        with pytest.raises(nl.SpecFieldError, match="finite"):
            nl.ema(value)
