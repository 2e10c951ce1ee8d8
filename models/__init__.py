"""svd-serve models package."""
