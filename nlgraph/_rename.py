"""Renaming a spec under a prefix and binding its inputs: how graphs are composed (``include``)."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from nlgraph.flows import Flow, FlowBase
from nlgraph.level import GraphSpec

_FLOW = TypeAdapter(Flow)


def _rename(node: Any, levels: set[str], inputs: dict[str, Any], prefix: str) -> Any:
    if isinstance(node, list | tuple):
        return [_rename(x, levels, inputs, prefix) for x in node]
    if not isinstance(node, dict):
        return node
    if node.get("op") == "input":
        name = node["name"]
        return inputs.get(name, {"op": "input", "name": f"{prefix}.{name}"})
    if node.get("op") == "ref":
        return {"op": "ref", "name": f"{prefix}.{node['name']}"}
    out = {}
    for key, value in node.items():
        names_level = key in ("level", "wrt", "src", "dst") or (
            key == "objective" and node.get("op") == "grad"
        )
        if names_level and isinstance(value, str) and value in levels:
            out[key] = f"{prefix}.{value}"
        else:
            out[key] = _rename(value, levels, inputs, prefix)
    return out


def rename_spec(
    spec: GraphSpec, prefix: str, bind: dict[str, FlowBase]
) -> tuple[GraphSpec, dict[str, FlowBase]]:
    """``spec`` with every level ``n`` renamed ``prefix.n`` and bound inputs substituted."""
    levels = {lv.name for lv in spec.levels}
    bound = {k: v.model_dump() for k, v in bind.items()}
    data = spec.model_dump()
    data["levels"] = [
        {
            **_rename(lv, levels, bound, prefix),
            "name": f"{prefix}.{lv['name']}",
            # the sub-graph's default chunk travels with its levels
            "chunk": lv["chunk"] if lv["chunk"] is not None else spec.chunk,
        }
        for lv in data["levels"]
    ]
    data["flows"] = {
        f"{prefix}.{k}": _rename(v, levels, bound, prefix) for k, v in data["flows"].items()
    }
    data["inputs"] = [
        {**i, "name": f"{prefix}.{i['name']}"} for i in data["inputs"] if i["name"] not in bind
    ]
    data["diff"] = _rename(data["diff"], levels, bound, prefix)
    outputs = {
        k: _FLOW.validate_python(_rename(v, levels, bound, prefix))
        for k, v in data["outputs"].items()
    }
    data["outputs"] = {}
    return GraphSpec.model_validate(data), outputs
