"""JSON/YAML: schema versions, safe loading, clear errors for bad files."""

from __future__ import annotations

import json

import pytest
from specs import small_memory

import nlgraph as nl


def test_schema_version_comes_first_and_is_current():
    data = json.loads(small_memory().to_json())
    assert next(iter(data)) == "schema_version"
    assert data["schema_version"] == nl.SCHEMA_VERSION


def test_newer_schema_is_a_clear_error():
    data = nl.to_dict(small_memory())
    data["schema_version"] = nl.SCHEMA_VERSION + 1
    with pytest.raises(nl.SchemaVersionError, match="upgrade nlgraph"):
        nl.from_dict(data)


def test_yaml_loading_never_executes_code(tmp_path):
    marker = tmp_path / "pwned"
    text = f"!!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(nl.SpecError, match="not valid YAML"):
        nl.from_yaml(text)
    assert not marker.exists()


@pytest.mark.parametrize(
    "text,needle",
    [("{", "not valid JSON"), ("[]", "expected a mapping"), ('{"schema_version": "1"}', "integer")],
)
def test_bad_json(text, needle):
    with pytest.raises(nl.SpecError, match=needle):
        nl.from_json(text)


def test_save_and_load_files(tmp_path):
    g = small_memory()
    for suffix in (".json", ".yaml", ".yml"):
        path = nl.save(g, tmp_path / f"g{suffix}")
        assert nl.load(path) == g
    with pytest.raises(nl.SpecError, match="does not exist"):
        nl.load(tmp_path / "missing.json")
    with pytest.raises(nl.SpecError, match="unknown spec format"):
        nl.save(g, tmp_path / "g.toml")
    with pytest.raises(nl.SpecError, match="directory"):
        nl.load(tmp_path)


def test_compact_files_omit_empty_defaults():
    text = small_memory().to_yaml()
    assert "null" not in text and "doc: ''" not in text
