"""Provider routing and cost (issue #6): the provider asked for, why a job went where it went,
and the provider's credits behind its cost.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # `provider` keeps where the job ran; `requested_provider` what the client asked for
    # (local|runway|auto), so a re-run can still route an `auto` job elsewhere.
    op.add_column(
        "jobs", sa.Column("requested_provider", sa.String(16), server_default=sa.text("'auto'"), nullable=False)
    )
    op.add_column("jobs", sa.Column("routing_reason", sa.String(64), nullable=True))
    op.add_column("jobs", sa.Column("provider_credits", sa.Float(), nullable=True))
    # Per-owner monthly cost totals read the owner's jobs of one month.
    op.create_index("ix_jobs_owner_id_completed_at", "jobs", ["owner_id", "completed_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_id_completed_at", table_name="jobs")
    # Batch mode: SQLite before 3.35 cannot drop a column in place.
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("provider_credits")
        batch.drop_column("routing_reason")
        batch.drop_column("requested_provider")
