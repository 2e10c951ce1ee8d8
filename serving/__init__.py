"""svd-serve serving package."""
