"""Tenant limits shared by every process of a catalogue (server/tenancy/shared_limits.py): the token
buckets of each tenant, and requests in flight per (tenant, process) under a lease.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

New tables only: nothing existing changes, and they start empty (full buckets).
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_MOMENT = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table("tenant_buckets",
                    sa.Column("tenant", sa.String(64), primary_key=True),
                    sa.Column("requests", sa.Float(), nullable=False),
                    sa.Column("tokens", sa.Float(), nullable=False),
                    sa.Column("updated_at", _MOMENT, nullable=False))
    op.create_table("tenant_in_flight",
                    sa.Column("tenant", sa.String(64), primary_key=True),
                    sa.Column("holder", sa.String(96), primary_key=True),
                    sa.Column("count", sa.Integer(), nullable=False),
                    sa.Column("lease_at", _MOMENT, nullable=False))
    op.create_index("ix_tenant_in_flight_lease_at", "tenant_in_flight", ["lease_at"])


def downgrade() -> None:
    op.drop_table("tenant_in_flight")
    op.drop_table("tenant_buckets")
