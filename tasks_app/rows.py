"""Plain SQL for the hottest reads (token check, task poll), with the ORM's value conversions.

Building an ORM query costs more CPU than running it for one-row lookups by key; a status poll
does several. ``converted_rows`` runs fixed SQL and converts each column exactly as the ORM would
convert a value of the model field it comes from (JSON decoding, SQLite datetimes, ...), so the
instances built from the rows with ``Model.from_db`` are the ones a queryset would give.

On PostgreSQL each statement is prepared once per connection (server-side binding; Django's own
queries bind client-side and are never prepared): planning was most of the server's work for
these lookups. That needs a direct connection, or a pooler that keeps prepared statements
(PgBouncer >= 1.21 with ``max_prepared_statements``); ``LIGHTX2V_DB_PREPARE=0`` turns it off.
"""
import time

from django.db import connection
from django.db.models import Field, Model

_converters_by_fields: dict[tuple, list] = {}


def columns(*fields: Field) -> str:
    """``"table"."column"`` of each field, comma-separated, for a SELECT list."""
    return ", ".join(f'"{field.model._meta.db_table}"."{field.column}"' for field in fields)


def fields_of(model: type[Model], *names: str) -> list[Field]:
    return [model._meta.get_field(name) for name in names]


def converted_rows(sql: str, params: list, fields: list[Field]) -> list[tuple]:
    """The rows of ``sql``, whose columns hold the values of ``fields`` in that order, converted."""
    key = (connection.alias, connection.vendor, tuple(fields))
    converters = _converters_by_fields.get(key)
    if converters is None:
        converters = []
        for field in fields:
            column = field.get_col(field.model._meta.db_table)
            steps = connection.ops.get_db_converters(column) + field.get_db_converters(connection)
            converters.append((column, steps))
        _converters_by_fields[key] = converters
    raw_rows = plain_rows(sql, params)
    rows = []
    for raw_row in raw_rows:
        values = list(raw_row)
        for index, (column, steps) in enumerate(converters):
            for convert in steps:
                values[index] = convert(values[index], column, connection)
        rows.append(tuple(values))
    return rows


def plain_rows(sql: str, params) -> list[tuple]:
    """The rows of ``sql`` as the driver gives them (for columns that need no conversion, e.g. counts)."""
    return _fetch_prepared(sql, params) if connection.vendor == "postgresql" else _fetch(sql, params)


def _fetch(sql: str, params: list) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def _fetch_prepared(sql: str, params: list) -> list[tuple]:
    import psycopg  # the PostgreSQL driver; only imported where it is the backend

    connection.ensure_connection()
    started = time.monotonic()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        # Prepared unless the connection's prepare_threshold is None (LIGHTX2V_DB_PREPARE=0): then bound only.
        cursor.execute(sql, params, prepare=True)
        found = cursor.fetchall()
    if connection.queries_logged:  # DEBUG, or a test counting queries: log it as Django's cursors do
        connection.queries_log.append({"sql": f"{sql} -- {params!r}", "time": f"{time.monotonic() - started:.3f}"})
    return found


def instance(model: type[Model], fields: list[Field], values: tuple) -> Model:
    """A ``model`` instance from converted ``values`` of ``fields`` (other fields deferred)."""
    return model.from_db(connection.alias, [field.attname for field in fields], values)
