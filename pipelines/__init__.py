"""svd-serve pipelines package."""
