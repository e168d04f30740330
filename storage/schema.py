"""Every migration set of the archive database, applied in this order when it opens.

A feature with tables of its own (identity, workitems...) defines a
``sqlite_utils.migrations.Migrations`` set in its module and lists it here; the schema
changes only through these.
"""
from __future__ import annotations

from .identity import migrations as identity_migrations
from .sqlite_index import migrations as index_migrations
from .workitems import migrations as workitem_migrations

MIGRATION_SETS = (index_migrations, identity_migrations, workitem_migrations)
