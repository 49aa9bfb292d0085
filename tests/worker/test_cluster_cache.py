"""The database cache that holds django-q2's cluster statistics (``tasks_app.cache``): Django's
semantics, in one statement per ``set`` on PostgreSQL."""
import time

import pytest
from django.core.cache import cache
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tasks_app.cache import ReconnectingDatabaseCache

pytestmark = pytest.mark.django_db


@pytest.fixture
def table(db):
    """The test database's cache table (Django creates it with the test database), emptied."""
    cache.clear()
    yield
    cache.clear()


def test_set_is_one_statement_and_reads_back_as_djangos_would(table):
    with CaptureQueriesContext(connection) as queries:
        assert cache.set("stat", {"workers": [1, 2]}, 30) is not False
    assert len(queries.captured_queries) == 1
    assert cache.get("stat") == {"workers": [1, 2]}

    cache.set("stat", "replaced", None)  # overwrite; None: never expires
    assert cache.get("stat") == "replaced"
    with connection.cursor() as cursor:
        cursor.execute('SELECT "expires" FROM "lightx2v_cache" WHERE "cache_key" = %s', [cache.make_key("stat")])
        assert cursor.fetchone()[0].year == 9999
    cache.set("gone", "x", 0)  # 0: expired at once, as in Django
    assert cache.get("gone", "default") == "default"


def test_add_touch_and_expiry_keep_djangos_behaviour(table):
    cache.set("short", "v", 1)
    assert cache.add("short", "other") is False  # live: add leaves it
    assert cache.touch("short", 60) is True
    time.sleep(1.2)
    assert cache.get("short") == "v"  # the touch extended it
    cache.set("expiring", "v", 1)
    time.sleep(1.2)
    assert cache.get("expiring") is None
    assert cache.add("expiring", "new") is True  # expired: add takes the key
    assert cache.get("expiring") == "new"


def test_sets_still_cull_the_table(table):
    small = ReconnectingDatabaseCache("lightx2v_cache", {"OPTIONS": {"MAX_ENTRIES": 5, "CULL_FREQUENCY": 2}})
    for index in range(30):
        key = f"key-{99 - index}"  # each new key sorts first, where a cull (by key order) starts
        small.set(key, index, 300)
        assert small.get(key) == index, "a set's own cull must not take the value it wrote"
    with connection.cursor() as cursor:
        cursor.execute('SELECT count(*) FROM "lightx2v_cache"')
        rows = cursor.fetchone()[0]
    assert rows <= 6  # Django's bound: one more than MAX_ENTRIES before the next set culls
