"""Baseline: the schema of loraserve 0.1.0, exactly as its stores created it.

Revision ID: 0001
Revises:
Create Date: 2026-12-02

Release 0.1.0 had no migrations: each store ran `create_all` for its own tables when it opened, so a
catalogue it made has no alembic_version table and holds the tables of the stores that were opened on it
(a server opened them all; `loraserve keys` only the adapters' and the keys'). Upgrading such a catalogue
runs this revision, which creates only the tables it lacks: for a full 0.1.0 catalogue that is a stamp.
A fresh database gets every table.
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_MOMENT = sa.DateTime(timezone=True)


def _tables() -> list[tuple[str, list, list[tuple[str, list[str]]]]]:
    """(table, columns and constraints, indexes) of 0.1.0, in creation order."""
    return [
        ("adapter_versions", [
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("name", sa.String(64), nullable=False),
            sa.Column("version", sa.Integer(), nullable=False),
            sa.Column("blob_key", sa.String(64), nullable=False),
            sa.Column("weights_sha256", sa.String(64), nullable=False),
            sa.Column("description", sa.Text(), nullable=False),
            sa.Column("rank", sa.Integer(), nullable=False),
            sa.Column("alpha", sa.Double(), nullable=False),
            sa.Column("target_modules", sa.JSON(), nullable=False),
            sa.Column("use_dora", sa.Boolean(), nullable=False),
            sa.Column("use_rslora", sa.Boolean(), nullable=False),
            sa.Column("trainable_params", sa.BigInteger(), nullable=False),
            sa.Column("adapted_base_params", sa.BigInteger(), nullable=False),
            sa.Column("size_bytes", sa.BigInteger(), nullable=False),
            sa.Column("source", sa.String(16), nullable=False),
            sa.Column("created_at", _MOMENT, nullable=False),
            sa.Column("deleted_at", _MOMENT, nullable=True),
            sa.UniqueConstraint("name", "version"),
        ], [("ix_adapter_versions_name", ["name"])]),
        ("aliases", [
            sa.Column("alias", sa.String(64), primary_key=True),
            sa.Column("name", sa.String(64), nullable=False),
            sa.Column("version", sa.Integer(), nullable=False),
            sa.Column("created_at", _MOMENT, nullable=False),
            sa.Column("updated_at", _MOMENT, nullable=False),
        ], []),
        ("experiments", [
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("name", sa.String(64), nullable=False, unique=True),
            sa.Column("description", sa.Text(), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("variants", sa.JSON(), nullable=False),
            sa.Column("assignment_key", sa.String(16), nullable=False),
            sa.Column("min_samples", sa.Integer(), nullable=False),
            sa.Column("promotion", sa.JSON(), nullable=True),
            sa.Column("created_at", _MOMENT, nullable=False),
            sa.Column("updated_at", _MOMENT, nullable=False),
            sa.Column("started_at", _MOMENT, nullable=True),
            sa.Column("stopped_at", _MOMENT, nullable=True),
        ], []),
        ("experiment_requests", [
            sa.Column("request_id", sa.String(128), primary_key=True),
            sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id"), nullable=False),
            sa.Column("variant", sa.String(64), nullable=False),
            sa.Column("adapter", sa.String(128), nullable=True),
            sa.Column("assignment_key", sa.String(256), nullable=True),
            sa.Column("created_at", _MOMENT, nullable=False),
            sa.Column("finished_at", _MOMENT, nullable=True),
            sa.Column("error", sa.String(64), nullable=True),
            sa.Column("output_tokens", sa.Integer(), nullable=False),
            sa.Column("ttft_s", sa.Double(), nullable=True),
            sa.Column("latency_s", sa.Double(), nullable=True),
            sa.Column("score", sa.Double(), nullable=True),
            sa.Column("scored_at", _MOMENT, nullable=True),
        ], [("ix_experiment_requests_experiment_id", ["experiment_id"])]),
        ("tenants", [
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("created_at", _MOMENT, nullable=False),
        ], []),
        ("api_keys", [
            sa.Column("id", sa.String(32), primary_key=True),
            sa.Column("digest", sa.String(64), nullable=False, unique=True),
            sa.Column("role", sa.String(16), nullable=False),
            sa.Column("tenant", sa.String(64), nullable=True),
            sa.Column("label", sa.String(128), nullable=False),
            sa.Column("created_at", _MOMENT, nullable=False),
            sa.Column("revoked_at", _MOMENT, nullable=True),
        ], [("ix_api_keys_tenant", ["tenant"])]),
        ("name_owners", [
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("tenant", sa.String(64), nullable=True),
            sa.Column("public", sa.Boolean(), nullable=False),
            sa.Column("created_at", _MOMENT, nullable=False),
        ], [("ix_name_owners_tenant", ["tenant"])]),
        ("audit_events", [
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("at", _MOMENT, nullable=False),
            sa.Column("key_id", sa.String(32), nullable=False),
            sa.Column("tenant", sa.String(64), nullable=True),
            sa.Column("action", sa.String(32), nullable=False),
            sa.Column("target", sa.String(160), nullable=False),
            sa.Column("detail", sa.JSON(), nullable=False),
        ], [("ix_audit_events_at", ["at"]), ("ix_audit_events_tenant", ["tenant"])]),
    ]


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    for table, columns, indexes in _tables():
        if table in existing:
            continue
        op.create_table(table, *columns)
        for index, index_columns in indexes:
            op.create_index(index, table, index_columns)


def downgrade() -> None:
    for table, _, _ in reversed(_tables()):
        op.drop_table(table)
