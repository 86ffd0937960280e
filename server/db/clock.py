"""Moments in the database: always stored in UTC, always read back as aware UTC datetimes.

SQLite keeps no time zone (a DATETIME is a naive string); PostgreSQL hands back the session's zone.
`UtcDateTime` hides both: every column of a moment uses it, so no store converts by hand.
"""

from datetime import UTC, datetime

from sqlalchemy import DateTime
from sqlalchemy.types import TypeDecorator


def utc_now() -> datetime:
    """The one clock of the stores."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """DATETIME / TIMESTAMP WITH TIME ZONE. Binds an aware datetime (refuses a naive one: its zone is a
    guess) converted to UTC; returns it with the UTC zone put back."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the database keeps moments in UTC, give a zone")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
