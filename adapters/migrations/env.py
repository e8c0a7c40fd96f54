"""Alembic environment for the loraplex registry.

Run programmatically by `loraplex.adapters.sql.migrate`, which passes an open connection (inside
a write transaction holding the migration lock) in `config.attributes["connection"]`. For ad-hoc
use with the alembic CLI, set `sqlalchemy.url` in the config instead.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from loraplex.adapters.sql import VERSION_TABLE, metadata

config = context.config


def run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=True,  # SQLite can only ALTER through table copies
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    with create_engine(config.get_main_option("sqlalchemy.url")).begin() as conn:
        run(conn)
