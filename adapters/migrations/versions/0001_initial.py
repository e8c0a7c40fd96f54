"""Initial registry schema: revision counter, bases, adapter versions, aliases.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    meta = op.create_table(
        "loraplex_meta",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(meta, [{"id": 1, "revision": 0}])
    op.create_table(
        "loraplex_bases",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("fingerprint", sa.String(80), nullable=False),
        sa.Column("record", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "loraplex_adapter_versions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("base_name", sa.String(64), sa.ForeignKey("loraplex_bases.name"), nullable=False),
        sa.Column("base_fingerprint", sa.String(80), nullable=False),
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("artifact_uri", sa.Text, nullable=False),
        sa.Column("total_size", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("record", sa.Text, nullable=False),  # the whole AdapterVersion as JSON
        sa.UniqueConstraint("name", "version", name="uq_loraplex_versions_name_version"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_loraplex_versions_name_content", "loraplex_adapter_versions",
                    ["name", "content_sha256"])
    op.create_table(
        "loraplex_aliases",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("alias", sa.String(64), nullable=False),
        sa.Column("weights", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("name", "alias", name="uq_loraplex_aliases_name_alias"),
    )


def downgrade() -> None:
    op.drop_table("loraplex_aliases")
    op.drop_index("ix_loraplex_versions_name_content", "loraplex_adapter_versions")
    op.drop_table("loraplex_adapter_versions")
    op.drop_table("loraplex_bases")
    op.drop_table("loraplex_meta")
