"""Every output of a job with its checksum, and result-cache columns (issue #4 outputs).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out here rather than imported from serving.db.models (see 0001).
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    # Server defaults fill the rows that already exist: no outputs map, not cached.
    op.add_column("jobs", sa.Column("outputs", _JSON, server_default=sa.text("'{}'"), nullable=False))
    op.add_column("jobs", sa.Column("cached", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column("jobs", sa.Column("cached_from", sa.Uuid(as_uuid=False), nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite before 3.35 cannot drop a column in place.
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cached_from")
        batch.drop_column("cached")
        batch.drop_column("outputs")
