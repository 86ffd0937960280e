"""One namespace: the `names` table (every adapter name, alias and experiment name, its kind, its owner
and whether it is public) replaces `name_owners`.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

Filled from what exists: every adapter name (deleted ones too: an adapter name stays claimed), alias and
experiment, with its owner and public flag from name_owners (no row there: the admins', private). A
name_owners row whose alias or experiment is gone is dropped: deleting those frees the name. Release
0.1.0 could let an adapter and an experiment (or an alias and an experiment) share a name; such a name
keeps its first kind in the order adapter, alias, experiment, and its rows stay as they are.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_MOMENT = sa.DateTime(timezone=True)


def _columns(*extra: sa.Column) -> list[sa.Column]:
    """The columns names and name_owners share, with `extra` after the name."""
    return [sa.Column("name", sa.String(64), primary_key=True), *extra,
            sa.Column("tenant", sa.String(64), nullable=True), sa.Column("public", sa.Boolean(), nullable=False),
            sa.Column("created_at", _MOMENT, nullable=False)]


def _view(table: str, *columns: sa.Column) -> sa.TableClause:
    """A typed handle on an existing table, for reading it."""
    return sa.table(table, *(sa.column(c.name, c.type) for c in columns))


def upgrade() -> None:
    names = op.create_table("names", *_columns(sa.Column("kind", sa.String(16), nullable=False)))
    op.create_index("ix_names_tenant", "names", ["tenant"])
    bind = op.get_bind()
    owners_table = _view("name_owners", *_columns())
    owners = {row.name: row for row in bind.execute(sa.select(owners_table))}
    claimed: dict[str, dict] = {}
    for kind, table, column in (("adapter", "adapter_versions", "name"), ("alias", "aliases", "alias"),
                                ("experiment", "experiments", "name")):
        source = _view(table, sa.Column(column, sa.String(64)), sa.Column("created_at", _MOMENT))
        name, created = source.c[column], source.c.created_at
        for row in bind.execute(sa.select(name, sa.func.min(created)).group_by(name).order_by(name)):
            owner = owners.get(row[0])
            claimed.setdefault(row[0], {
                "name": row[0], "kind": kind, "tenant": owner.tenant if owner else None,
                "public": bool(owner.public) if owner else False, "created_at": row[1],
            })
    if claimed:
        op.bulk_insert(names, list(claimed.values()))
    op.drop_table("name_owners")


def downgrade() -> None:
    owners = op.create_table("name_owners", *_columns())
    op.create_index("ix_name_owners_tenant", "name_owners", ["tenant"])
    names = _view("names", *_columns())
    rows = op.get_bind().execute(sa.select(names).where(names.c.tenant.is_not(None) | names.c.public))
    owned = [row._asdict() for row in rows]
    if owned:
        op.bulk_insert(owners, owned)
    op.drop_table("names")
