"""Alembic migrations of the job store; run them with `svd-serve migrate` (`serving.db.migrate`)."""
