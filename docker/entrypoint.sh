#!/bin/sh
# Entry point of the LightX2V image. PID 1 is tini, which forwards SIGTERM to the one process it
# started; this script `exec`s the command, so that process is gunicorn or django-q2's qcluster main
# process itself, and `docker stop` gives qcluster the SIGTERM it needs to hand a running task back.
#
#   WAIT_FOR_DB_S   seconds to wait for the database before starting (default 60; 0 = do not wait).
#                   django-q2's qcluster can hang if its first database connection fails.
#   RUN_MIGRATIONS  1 = `migrate --noinput` and `createcachetable` before the command (default 0;
#                   compose.yml runs them once in its `migrate` service instead).
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."

if [ "${WAIT_FOR_DB_S:-60}" != 0 ]; then
    python "$here/healthcheck.py" wait-db "${WAIT_FOR_DB_S:-60}"
fi

if [ "${RUN_MIGRATIONS:-0}" = 1 ]; then
    python manage.py migrate --noinput
    python manage.py createcachetable
fi

exec "$@"
