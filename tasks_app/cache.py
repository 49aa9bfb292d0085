"""The shared cache (django-q2's cluster statistics live here) on the database, surviving database restarts.

Django reopens a broken connection only at request boundaries; django-q2's sentinel has none, so
after a database restart its statistics writes would fail forever and the cluster would look dead.
This backend drops the broken connection on a database error, so the next call reconnects.
"""
from django.core.cache.backends.db import DatabaseCache
from django.db import DatabaseError, connections, router


class ReconnectingDatabaseCache(DatabaseCache):
    def _reconnect_after_error(self, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except DatabaseError:
            connections[router.db_for_write(self.cache_model_class)].close()
            raise

    def get_many(self, keys, version=None):
        return self._reconnect_after_error(super().get_many, keys, version=version)

    def _base_set(self, mode, key, value, timeout=None):
        return self._reconnect_after_error(super()._base_set, mode, key, value, timeout)

    def _base_delete_many(self, keys):
        return self._reconnect_after_error(super()._base_delete_many, keys)

    def has_key(self, key, version=None):
        return self._reconnect_after_error(super().has_key, key, version=version)

    def clear(self):
        return self._reconnect_after_error(super().clear)
