"""The shared cache (django-q2's cluster statistics live here) on the database, surviving database restarts.

Django reopens a broken connection only at request boundaries; django-q2's sentinel has none, so
after a database restart its statistics writes would fail forever and the cluster would look dead.
This backend drops the broken connection on a database error, so the next call reconnects.

On PostgreSQL a ``set`` is one statement (an upsert that also counts the rows for culling) instead
of Django's five (count, begin, read, update or insert, commit): every qcluster's guard writes its
statistics here twice a second, idle or not.
"""
import base64
import pickle
from datetime import datetime, timezone

from django.conf import settings
from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.cache.backends.db import DatabaseCache
from django.db import DatabaseError, connections, router
from django.utils.timezone import now as tz_now


class ReconnectingDatabaseCache(DatabaseCache):
    def _reconnect_after_error(self, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except DatabaseError:
            connections[router.db_for_write(self.cache_model_class)].close()
            raise

    def get_many(self, keys, version=None):
        return self._reconnect_after_error(super().get_many, keys, version=version)

    def _base_set(self, mode, key, value, timeout=DEFAULT_TIMEOUT):
        db = router.db_for_write(self.cache_model_class)
        if mode == "set" and connections[db].vendor == "postgresql":
            return self._reconnect_after_error(self._upsert, db, key, value, timeout)
        return self._reconnect_after_error(super()._base_set, mode, key, value, timeout)

    def _upsert(self, db, key, value, timeout) -> bool:
        """Django's ``set`` (same stored value and expiry, same culling) in one statement.

        Unlike Django's, a database error is raised rather than answered with False: the
        concurrent-insert race Django hides that way cannot happen with ``ON CONFLICT``, and a
        broken connection must reach ``_reconnect_after_error``.
        """
        timeout = self.get_backend_timeout(timeout)
        if timeout is None:
            expires = datetime.max
        else:
            expires = datetime.fromtimestamp(timeout, tz=timezone.utc if settings.USE_TZ else None)
        connection = connections[db]
        quote = connection.ops.quote_name
        table, key_column, value_column, expires_column = map(quote, (self._table, "cache_key", "value", "expires"))
        encoded = base64.b64encode(pickle.dumps(value, self.pickle_protocol)).decode("latin1")
        upsert = (
            f"INSERT INTO {table} ({key_column}, {value_column}, {expires_column}) VALUES (%s, %s, %s)"
            f" ON CONFLICT ({key_column}) DO UPDATE"
            f" SET {value_column} = EXCLUDED.{value_column}, {expires_column} = EXCLUDED.{expires_column}"
        )
        params = [key, encoded, connection.ops.adapt_datetimefield_value(expires.replace(microsecond=0))]
        with connection.cursor() as cursor:
            # The count is of the rows before this write (a CTE's changes are invisible to its statement).
            cursor.execute(f"WITH written AS ({upsert}) SELECT count(*) FROM {table}", params)
            rows = cursor.fetchone()[0]
            if rows > self._max_entries:
                self._cull(db, cursor, tz_now().replace(microsecond=0), rows)
                cursor.execute(upsert, params)  # Django culls before it writes: the cull may have taken this key
        return True

    def _base_delete_many(self, keys):
        return self._reconnect_after_error(super()._base_delete_many, keys)

    def has_key(self, key, version=None):
        return self._reconnect_after_error(super().has_key, key, version=version)

    def clear(self):
        return self._reconnect_after_error(super().clear)
