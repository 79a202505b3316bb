"""JSON and YAML round trips of graph specs, with a schema version.

Loading never executes code: YAML goes through ``yaml.safe_load`` and import paths stay strings
until a graph is compiled. A spec written by a newer schema raises :class:`SchemaVersionError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from nlgraph._errors import SchemaVersionError, SpecError
from nlgraph.graph import Graph
from nlgraph.level import SCHEMA_VERSION, GraphSpec
from nlgraph.validation import format_validation_error

__all__ = ["to_dict", "from_dict", "to_json", "from_json", "to_yaml", "from_yaml", "load", "save"]

# Bounds on a spec document, checked before it is parsed into objects or validated: the
# library's largest specs nest 13 levels deep and hold a few thousand values.
MAX_SPEC_BYTES = 16 << 20
MAX_DEPTH = 100
MAX_VALUES = 1_000_000  # counted as expanded: a YAML alias counts every time it is used


def _bounded_text(text: str, source: str) -> None:
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(
            f"{source}: {len(text):,} characters, more than a spec may hold ({MAX_SPEC_BYTES:,})"
        )


def _too_deep(source: str) -> SpecError:
    return SpecError(f"{source}: nested more than {MAX_DEPTH} levels deep; a spec nests far less")


def _check_shape(data: Any, source: str) -> None:
    """Depth and value count of parsed JSON (no sharing), without recursion."""
    stack, count = [(data, 1)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise _too_deep(source)
        if count > MAX_VALUES:
            raise SpecError(f"{source}: more than {MAX_VALUES:,} values; not a spec nlgraph wrote")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _safe_load(text: str, source: str) -> Any:
    """``yaml.safe_load``, with the depth and expanded size of the document's node graph
    checked before anything is built from it: aliases are counted each time they are used, so
    an alias bomb is refused unexpanded."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:
            raise _too_deep(source) from None
        if root is not None:
            _check_nodes(root, source)
        return None if root is None else loader.construct_document(root)
    finally:
        loader.dispose()


def _check_nodes(root: Any, source: str) -> None:
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded values, depth)

    def measure(node: Any) -> tuple[int, int]:
        hit = sizes.get(id(node))
        if hit is None:
            children: list[Any] = []
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [v for pair in node.value for v in pair]
            parts = [measure(c) for c in children]
            hit = (1 + sum(p[0] for p in parts), 1 + max((p[1] for p in parts), default=0))
            if hit[1] > MAX_DEPTH:
                raise _too_deep(source)
            if hit[0] > MAX_VALUES:
                raise SpecError(
                    f"{source}: expands to more than {MAX_VALUES:,} values (YAML aliases "
                    "counted each time they are used); not a spec nlgraph wrote"
                )
            sizes[id(node)] = hit
        return hit

    measure(root)


def _spec(graph: Graph | GraphSpec) -> GraphSpec:
    return graph.spec if isinstance(graph, Graph) else graph


_VERBATIM = ("meta", "kwargs")  # user data: kept exactly as given


def _compact(node: Any) -> Any:
    # Drop fields left at an empty default (None, "", [], {}) so files stay readable; every such
    # field defaults to exactly that value, so loading restores it (the round-trip tests pin it).
    if isinstance(node, dict):
        return {
            k: (v if k in _VERBATIM else _compact(v))
            for k, v in node.items()
            if v not in (None, "", [], {}) or (k in _VERBATIM and v != {})
        }
    if isinstance(node, list):
        return [_compact(v) for v in node]
    return node


def to_dict(graph: Graph | GraphSpec) -> dict[str, Any]:
    """A plain, JSON-compatible dict; ``schema_version`` comes first."""
    data = _compact(_spec(graph).model_dump(mode="json"))
    return {"schema_version": data.pop("schema_version"), **data}


def from_dict(data: Any, source: str = "spec") -> Graph:
    """Build a graph from a dict, checking the schema version first."""
    if not isinstance(data, dict):
        raise SpecError(
            f"{source}: expected a mapping with 'schema_version', 'name' and 'levels', "
            f"got {type(data).__name__}"
        )
    version = data.get("schema_version")
    if version is None:
        raise SpecError(
            f"{source}: missing 'schema_version' (this nlgraph writes {SCHEMA_VERSION})"
        )
    if not isinstance(version, int) or isinstance(version, bool):
        raise SpecError(f"{source}: schema_version must be an integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{source}: schema_version {version} is newer than this nlgraph supports "
            f"({SCHEMA_VERSION}); upgrade nlgraph to load it"
        )
    if version < 1:
        raise SpecError(f"{source}: schema_version {version} is not a valid version (>= 1)")
    if version < SCHEMA_VERSION:  # version 1 lacks only what 2 added: it reads as it is
        data = {**data, "schema_version": SCHEMA_VERSION}
    try:
        spec = GraphSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{source}: {format_validation_error(err, data)}") from None
    return Graph.from_spec(spec)


def to_json(graph: Graph | GraphSpec, indent: int | None = 2) -> str:
    return json.dumps(to_dict(graph), indent=indent, ensure_ascii=False)


def from_json(text: str, source: str = "JSON spec") -> Graph:
    _bounded_text(text, source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SpecError(f"{source}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except RecursionError:
        raise _too_deep(source) from None
    _check_shape(data, source)
    return from_dict(data, source)


def to_yaml(graph: Graph | GraphSpec) -> str:
    return yaml.safe_dump(to_dict(graph), sort_keys=False, allow_unicode=True)


def from_yaml(text: str, source: str = "YAML spec") -> Graph:
    _bounded_text(text, source)
    try:
        data = _safe_load(text, source)
    except yaml.YAMLError as err:
        raise SpecError(f"{source}: not valid YAML ({str(err).splitlines()[0]})") from None
    return from_dict(data, source)


def load(path: str | Path) -> Graph:
    """Load a ``.json``, ``.yaml`` or ``.yml`` spec file."""
    p = Path(path)
    if not p.exists():
        raise SpecError(f"spec file {str(p)!r} does not exist")
    if p.is_dir():
        raise SpecError(f"{str(p)!r} is a directory; expected a .json or .yaml spec file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"cannot read spec file {str(p)!r}: {err}") from None
    if p.suffix == ".json":
        return from_json(text, str(p))
    if p.suffix in (".yaml", ".yml"):
        return from_yaml(text, str(p))
    raise SpecError(f"{str(p)!r}: unknown spec format {p.suffix!r}; expected .json, .yaml or .yml")


def save(graph: Graph | GraphSpec, path: str | Path) -> Path:
    p = Path(path)
    if p.suffix == ".json":
        p.write_text(to_json(graph) + "\n", encoding="utf-8")
    elif p.suffix in (".yaml", ".yml"):
        p.write_text(to_yaml(graph), encoding="utf-8")
    else:
        raise SpecError(f"{str(p)!r}: unknown spec format {p.suffix!r}; use .json or .yaml")
    return p
