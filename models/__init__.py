"""Model registry and loading.

Only the light modules (specs, registry, errors) are re-exported here so that the ingress can
validate requests without importing torch; import `models.loading` / `models.tiny_random` for weights.
"""

from models.errors import ModelError, UnknownModel, WeightsNotFound
from models.registry import get_spec, list_specs
from models.specs import ModelSpec

__all__ = ["ModelError", "ModelSpec", "UnknownModel", "WeightsNotFound", "get_spec", "list_specs"]
