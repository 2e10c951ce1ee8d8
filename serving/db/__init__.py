"""The job store: SQLAlchemy models, Alembic migrations, the engine and the jobs repository.

PostgreSQL in production, a SQLite file in the embedded default; both behave the same here.
"""
