"""Schema compatibility across releases: the oldest code revision that works with this schema.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
# An expand step (a new table). Code at 0006 predates this rule and still demands its exact
# revision: the compatibility window opens with 0007.
oldest_compatible_revision: str | None = None


def upgrade() -> None:
    # Filled in by serving/migrations/env.py after every migration run.
    op.create_table(
        "schema_compatibility",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("oldest_code_revision", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schema_compatibility")),
    )


def downgrade() -> None:
    op.drop_table("schema_compatibility")
