"""Domain errors raised by services, and the one place that turns them (and Django's) into JSON 4xx."""
import functools
import logging

from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig, TooManyFieldsSent
from django.db import OperationalError
from django.http import Http404, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler

logger = logging.getLogger(__name__)
DATABASE_RETRY_AFTER_S = 5


class ServiceError(Exception):
    """Base of the domain errors; ``status_code`` is what the API answers."""

    status_code = status.HTTP_400_BAD_REQUEST

    def __init__(self, message: str, *, task=None):
        super().__init__(message)
        self.message = message
        self.task = task


class TaskNotCancellable(ServiceError):
    """The task already finished (succeed, failed or cancelled)."""

    status_code = status.HTTP_409_CONFLICT


class TaskNotRetryable(ServiceError):
    status_code = status.HTTP_409_CONFLICT


class IdempotencyKeyReused(ServiceError):
    """The caller's Idempotency-Key is live and belongs to a request with a different body."""

    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY


class RetryLater(ServiceError):
    """A limit that clears by itself; the response carries ``Retry-After: retry_after_s``."""

    def __init__(self, message: str, *, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyUnfinishedTasks(RetryLater):
    """The caller already has the most unfinished tasks one user may have."""

    status_code = status.HTTP_429_TOO_MANY_REQUESTS


class QueueFull(RetryLater):
    """The whole service has as many queued tasks as it accepts."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE


class PayloadTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "Request entity too large."


def api_exception_handler(exc, context):
    """DRF's handler plus domain errors; every error body is JSON."""
    if isinstance(exc, ServiceError):
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, RetryLater) else None
        return Response({"detail": exc.message}, status=exc.status_code, headers=headers)
    if isinstance(exc, OperationalError):
        # The database is restarting or unreachable: a retryable 503, never a 500.
        logger.warning("database unavailable: %s", exc)
        return Response(
            {"detail": "The database is unavailable; try again shortly."},
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
        )
    if isinstance(exc, RequestDataTooBig):
        exc = PayloadTooLarge(f"request body must be at most {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes")
    elif isinstance(exc, TooManyFieldsSent):
        exc = exceptions.ParseError(f"at most {settings.DATA_UPLOAD_MAX_NUMBER_FIELDS} form fields")
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    return exception_handler(exc, context)


def json_not_found(request, exception=None):
    """``handler404``: unknown URLs (e.g. a task id that is not a UUID) answer JSON, not HTML."""
    return JsonResponse({"detail": "Not found."}, status=404)


def json_server_error(request):
    """``handler500``: never leak a traceback; the details go to the log."""
    return JsonResponse({"detail": "Internal server error."}, status=500)


def json_bad_request(request, exception=None):
    return JsonResponse({"detail": "Bad request."}, status=400)


def read_only(view):
    """``view`` for GET/HEAD; any other method a JSON 405 with ``Allow`` (not Django's HTML CSRF page:
    the view changes nothing, so it needs no CSRF check)."""

    @csrf_exempt
    @functools.wraps(view)
    def answer(request, *args, **kwargs):
        if request.method not in ("GET", "HEAD"):
            response = JsonResponse({"detail": f'Method "{request.method}" not allowed.'}, status=405)
            response["Allow"] = "GET, HEAD"
            return response
        return view(request, *args, **kwargs)

    return answer
