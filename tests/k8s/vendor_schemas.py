"""Regenerate k8s/schemas/*.json from upstream CRDs (run by hand when bumping KubeRay or the
Prometheus operator):

    python -m tests.k8s.vendor_schemas ray.io_rayservices.yaml servicemonitors-crd.json ...

Each CRD's storage version's `openAPIV3Schema` becomes a JSON Schema with `apiVersion` and `kind`
fixed, descriptions dropped (size) and, like kubeconform's strict mode, `additionalProperties:
false` on every object that lists its properties and does not preserve unknown fields, so that
a misspelt field fails validation instead of being silently pruned by the API server.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

SCHEMAS = Path(__file__).resolve().parents[2] / "k8s" / "schemas"


def strict(node: Any, field_map: bool = False) -> Any:
    """`field_map`: `node` maps field names to schemas (a `properties`), where a field may well be
    called "description"."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    if field_map:
        return {k: strict(v) for k, v in node.items()}
    out = {k: strict(v, field_map=k == "properties") for k, v in node.items() if k != "description"}
    if (
        "properties" in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


def crd_schema(crd: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = strict(version["schema"]["openAPIV3Schema"])
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {"const": f"{group}/{version['name']}"}
    props["kind"] = {"const": kind}
    # metadata is validated by the API server's ObjectMeta, not by the CRD
    props["metadata"] = {"type": "object"}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    return f"{kind.lower()}_{group.split('.')[0]}_{version['name']}.json", schema


def main(paths: list[str]) -> None:
    for path in paths:
        text = Path(path).read_text()
        crd = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        name, schema = crd_schema(crd)
        (SCHEMAS / name).write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
        print(SCHEMAS / name)


if __name__ == "__main__":
    main(sys.argv[1:])
