"""Promotion decisions: one row per `loraplex adapters promote` (who, when, the whole record).

Revision ID: 0002
Revises: 0001
Create Date: 2025-06-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "loraplex_promotions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("alias", sa.String(64), nullable=False),
        sa.Column("candidate", sa.Integer, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("record", sa.Text, nullable=False),  # the whole PromotionDecision as JSON
        sqlite_autoincrement=True,
    )
    op.create_index("ix_loraplex_promotions_name", "loraplex_promotions", ["name", "id"])


def downgrade() -> None:
    op.drop_index("ix_loraplex_promotions_name", "loraplex_promotions")
    op.drop_table("loraplex_promotions")
