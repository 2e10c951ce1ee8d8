"""Storage URIs as kept in the jobs row: `local://<key>` or `s3://<bucket>/<key>`."""

from __future__ import annotations


def key_from_uri(uri: str) -> str:
    scheme, _, rest = uri.partition("://")
    if scheme == "s3":
        return rest.partition("/")[2]
    if scheme == "local":
        return rest
    raise ValueError(f"not a storage URI: {uri!r}")
