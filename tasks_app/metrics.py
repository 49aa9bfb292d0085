"""Prometheus ``/metrics``: queue depth per status, task durations, step time, failures, worker liveness.

Everything is read from the database at scrape time (the rows are the truth, and web and workers may
run on different machines), so any web process can answer. Access: with ``LIGHTX2V_METRICS_TOKEN``
set, ``Authorization: Bearer <it>``; without it, loopback clients only.
"""
import hmac
from datetime import timedelta

from django.conf import settings
from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, Sum
from django.http import HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from . import selectors
from .errors import read_only
from .models import TaskAttempt, VideoTask

DURATION_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)
RECENT_TASKS = 100
LOOPBACK = {"127.0.0.1", "::1"}


class TaskCollector:
    """Computes every series from the tables on each scrape."""

    def collect(self):
        tasks = GaugeMetricFamily("lightx2v_tasks", "Video tasks per status", labels=["status"])
        for status, count in selectors.status_counts().items():
            tasks.add_metric([status], count)
        yield tasks
        yield self._durations()
        yield self._recent_step_time()
        failures = CounterMetricFamily("lightx2v_task_failures", "Tasks that ended failed")
        failures.add_metric([], VideoTask.objects.filter(status=VideoTask.Status.FAILED).count())
        yield failures
        attempts = CounterMetricFamily("lightx2v_attempts", "Finished runs of tasks per outcome", labels=["outcome"])
        for row in TaskAttempt.objects.exclude(outcome="running").values("outcome").annotate(total=Count("pk")):
            attempts.add_metric([row["outcome"]], row["total"])
        yield attempts
        yield from self._workers()

    def _durations(self):
        run_time = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
        succeeded = VideoTask.objects.filter(status=VideoTask.Status.SUCCEED, started_at__isnull=False)
        counts = succeeded.annotate(run_time=run_time).aggregate(
            total=Count("pk"),
            total_time=Sum("run_time"),
            **{f"le_{le}": Count("pk", filter=Q(run_time__lte=timedelta(seconds=le))) for le in DURATION_BUCKETS_S},
        )
        seconds = counts["total_time"].total_seconds() if counts["total_time"] else 0.0
        buckets = [(str(float(le)), counts[f"le_{le}"]) for le in DURATION_BUCKETS_S] + [("+Inf", counts["total"])]
        family = HistogramMetricFamily(
            "lightx2v_task_duration_seconds", "Run time of succeeded tasks (claim to finish)"
        )
        family.add_metric([], buckets, sum_value=seconds)
        return family

    def _recent_step_time(self):
        family = GaugeMetricFamily(
            "lightx2v_recent_step_seconds", f"Mean denoising step time over the last {RECENT_TASKS} succeeded tasks"
        )
        step_times = selectors.recent_step_seconds(limit=RECENT_TASKS)
        family.add_metric([], sum(step_times) / len(step_times) if step_times else 0.0)
        return family

    def _workers(self):
        live = GaugeMetricFamily("lightx2v_live_workers", "Worker processes of running qclusters")
        live.add_metric([], selectors.live_worker_count())
        yield live
        heartbeat = GaugeMetricFamily(
            "lightx2v_worker_heartbeat_age_seconds", "Seconds since a running task's worker last heartbeat",
            labels=["worker"],
        )  # fmt: skip
        now = timezone.now()
        for task in VideoTask.objects.filter(status=VideoTask.Status.RUNNING, heartbeat_at__isnull=False):
            heartbeat.add_metric([task.worker_name], (now - task.heartbeat_at).total_seconds())
        yield heartbeat


registry = CollectorRegistry()
registry.register(TaskCollector())


def _allowed(request) -> bool:
    expected = settings.LIGHTX2V_METRICS_TOKEN
    if not expected:
        return request.META.get("REMOTE_ADDR") in LOOPBACK
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(given.encode(), expected.encode())


@csrf_exempt  # read-only: its 404 or 405 must not turn into Django's HTML CSRF page
def metrics_view(request):
    """The exposition text for GET/HEAD (a JSON 405 for other methods); 404 to a caller not allowed
    to scrape, whatever the method."""
    if not _allowed(request):
        return JsonResponse({"detail": "Not found."}, status=404)
    return _exposition(request)


@read_only
def _exposition(request):
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
