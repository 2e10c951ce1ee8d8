"""Create the jobs table.

Revision ID: 0001
Revises:
Create Date: 2025-09-05
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out here rather than imported from serving.db.models: a migration must keep creating
# the schema of its own revision even after the model moves on.
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts(name: str, nullable: bool) -> sa.Column[dt.datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Uuid(as_uuid=False), nullable=False),
        sa.Column("owner_id", sa.String(128), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=True),
        sa.Column("image_url", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("provider", sa.String(32), server_default=sa.text("'local'"), nullable=False),
        sa.Column("provider_job_id", sa.String(128), nullable=True),
        sa.Column("result_url", sa.Text(), nullable=True),
        sa.Column("thumbnail_url", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default=sa.text("3"), nullable=False),
        _ts("created_at", nullable=False),
        _ts("updated_at", nullable=False),
        _ts("started_at", nullable=True),
        _ts("completed_at", nullable=True),
        sa.Column("metadata", _JSON, nullable=False),
        sa.Column("params", _JSON, nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("priority", sa.String(8), server_default=sa.text("'normal'"), nullable=False),
        sa.Column("progress", sa.Float(), server_default=sa.text("0"), nullable=False),
        sa.Column("stage", sa.String(32), server_default=sa.text("'queued'"), nullable=False),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("input_hash", sa.String(128), nullable=True),
        sa.Column("webhook_url", sa.Text(), nullable=True),
        sa.Column("timings", _JSON, nullable=False),
        sa.Column("gpu_seconds", sa.Float(), nullable=True),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.UniqueConstraint("owner_id", "idempotency_key", name="uq_jobs_owner_id_idempotency_key"),
    )
    op.create_index("ix_jobs_owner_id_status", "jobs", ["owner_id", "status"])
    op.create_index("ix_jobs_owner_id_created_at_id", "jobs", ["owner_id", "created_at", "id"])
    op.create_index("ix_jobs_input_hash", "jobs", ["input_hash"])


def downgrade() -> None:
    op.drop_table("jobs")
