"""Reliability (issue #5): idempotency fingerprints, retries of failed jobs, the dead-letter index.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # SHA-256 of the request that used the Idempotency-Key: a repeat with another body is refused.
    op.add_column("jobs", sa.Column("idempotency_fingerprint", sa.String(64), nullable=True))
    # The failed job that `POST .../{id}/retry` re-runs; the original keeps its one outcome.
    op.add_column("jobs", sa.Column("retry_of", sa.Uuid(as_uuid=False), nullable=True))
    # The dead-letter view reads failed jobs, newest first.
    op.create_index("ix_jobs_status_created_at", "jobs", ["status", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_created_at", table_name="jobs")
    # Batch mode: SQLite before 3.35 cannot drop a column in place.
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("retry_of")
        batch.drop_column("idempotency_fingerprint")
