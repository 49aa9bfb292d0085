"""Container probes of the LightX2V image (standard library, plus Django for the worker and database).

    python docker/healthcheck.py [auto]         the worker probe in a container running qcluster, else web
    python docker/healthcheck.py web            GET /v1/service/status on this container's gunicorn: 200 = healthy
    python docker/healthcheck.py worker         this container's qcluster is in django-q2's live cluster stats
    python docker/healthcheck.py wait-db [S]    wait up to S seconds (default 60) for the database (entrypoint)

Exit status 0 = healthy / ready, 1 = not. One line on stdout says why (``docker inspect`` shows it).

The web probe sends the first ``ALLOWED_HOSTS`` entry as Host and ``X-Forwarded-Proto: https``, so it gets
200 rather than 400 (unknown host) or a redirect to https when ``LIGHTX2V_HTTPS=1`` (Django only trusts that
header when ``LIGHTX2V_HTTPS`` or ``LIGHTX2V_BEHIND_PROXY`` is on). ``HEALTHCHECK_URL`` overrides the URL.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent
DEFAULT_URL = "http://127.0.0.1:8000/v1/service/status"


def probe_host() -> str:
    """A Host header Django accepts: the first ALLOWED_HOSTS entry ("*" -> localhost, ".x.org" -> x.org)."""
    hosts = [h.strip() for h in os.environ.get("ALLOWED_HOSTS", "127.0.0.1,localhost").split(",") if h.strip()]
    host = hosts[0] if hosts else "localhost"
    if host == "*":
        return "localhost"
    return host.lstrip(".")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect is a failed probe, not something to follow
        return None


def check_web() -> tuple[bool, str]:
    url = os.environ.get("HEALTHCHECK_URL", DEFAULT_URL)
    request = urllib.request.Request(url, headers={"Host": probe_host(), "X-Forwarded-Proto": "https"})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "5"))) as response:
            body = response.read(500).decode("utf-8", "replace")
            return response.status == 200, f"web: HTTP {response.status} {body}"
    except urllib.error.HTTPError as exc:
        body = exc.read(500).decode("utf-8", "replace")
        where = f" -> {exc.headers.get('Location')}" if exc.headers.get("Location") else ""
        return False, f"web: HTTP {exc.code}{where} {body}"
    except OSError as exc:
        return False, f"web: {url}: {exc}"


def _django_setup() -> None:
    sys.path.insert(0, str(APP_DIR))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lightx2v_site.settings")
    import django

    django.setup()


def check_worker() -> tuple[bool, str]:
    """Healthy when a qcluster on this host (the container's hostname) reports Idle or Working with workers."""
    _django_setup()
    from django_q.conf import Conf
    from django_q.status import Stat

    host = socket.gethostname()
    try:
        mine = [stat for stat in Stat.get_all() if stat.host == host]
    except Exception as exc:  # noqa: BLE001 - any failure to read the stats is "not healthy"
        return False, f"worker: cluster stats unreadable: {exc}"
    if not mine:
        return False, f"worker: no qcluster of host {host} reported in the last seconds"
    running = {str(Conf.IDLE), str(Conf.WORKING)}
    for stat in mine:
        if str(stat.status) in running and stat.workers:
            return True, f"worker: cluster {stat.cluster_id} {stat.status}, {len(stat.workers)} worker process(es)"
    return False, "worker: " + ", ".join(f"cluster {s.cluster_id} {s.status}" for s in mine)


def wait_db(limit_s: float) -> tuple[bool, str]:
    _django_setup()
    from django.db import connection

    deadline = time.monotonic() + limit_s
    while True:
        try:
            connection.ensure_connection()
            connection.close()
            return True, f"wait-db: {connection.vendor} database is up"
        except Exception as exc:  # noqa: BLE001 - keep trying until the deadline
            if time.monotonic() >= deadline:
                return False, f"wait-db: database still unreachable after {limit_s:g} s: {exc}"
            print(f"wait-db: waiting for the database ({exc.__class__.__name__})", flush=True)
            connection.close()
            time.sleep(2)


def runs_qcluster() -> bool:
    """True when a process of this container was started as ``manage.py qcluster``."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"qcluster" in cmdline.read_bytes().split(b"\0"):
                return True
        except OSError:
            continue
    return False


def main(argv: list[str]) -> int:
    mode = argv[1] if len(argv) > 1 else "auto"
    if mode == "auto":
        mode = "worker" if runs_qcluster() else "web"
    if mode == "web":
        ok, message = check_web()
    elif mode == "worker":
        ok, message = check_worker()
    elif mode == "wait-db":
        ok, message = wait_db(float(argv[2]) if len(argv) > 2 else 60.0)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(message, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
