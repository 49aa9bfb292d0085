"""HTTP endpoints. Each view validates with a serializer, calls one service or selector, and answers.

No status is written here (see ``services``) and no file is touched except to stream a finished video.
"""
import re
import uuid
from pathlib import Path

from django.conf import settings
from django.db import connection
from django.db.models import Q
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import FormParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response

from inference.lora import list_loras
from inference.options import CACHE_KINDS
from inference.sampling import SCHEDULERS, default_shift

from . import fingerprints, selectors, services, storage
from .parsers import UnicodeJSONParser, UploadMultiPartParser
from .ranges import file_response
from .models import VideoTask
from .serializers import (
    RESIZE_MODES,
    QueueStatusSerializer,
    TaskCreatedSerializer,
    TaskStatusSerializer,
    VideoFormRequestSerializer,
    VideoRequestSerializer,
)

_CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", re.ASCII)
SERVICE_VERSION = settings.SPECTACULAR_SETTINGS["VERSION"]
REQUEST_DEFAULTS = {
    name: field.default
    for name, field in VideoRequestSerializer().fields.items()
    if name not in ("prompt", "negative_prompt", "image_path", "seed")
}
MP4_RESPONSE = OpenApiResponse(response=OpenApiTypes.BINARY, description="the H.264 MP4 (video/mp4)")
POSTER_RESPONSE = OpenApiResponse(response=OpenApiTypes.BINARY, description="the poster frame (image/jpeg)")
ERROR_RESPONSE = OpenApiResponse(
    response=inline_serializer("Error", {"detail": serializers.CharField()}), description="JSON error"
)
FIELD_ERRORS = OpenApiResponse(response=OpenApiTypes.OBJECT, description="field name -> list of rule failures")
SUBMIT_ERRORS = {
    400: FIELD_ERRORS,
    413: OpenApiResponse(response=ERROR_RESPONSE.response, description="body (or upload) over the size limit"),
    415: OpenApiResponse(response=ERROR_RESPONSE.response, description="unsupported Content-Type"),
    422: OpenApiResponse(response=ERROR_RESPONSE.response, description="Idempotency-Key reused with another body"),
    429: OpenApiResponse(response=ERROR_RESPONSE.response, description="too many unfinished tasks (Retry-After)"),
    503: OpenApiResponse(response=ERROR_RESPONSE.response, description="queue full (Retry-After)"),
}
SUBMIT_HEADERS = [
    OpenApiParameter("Location", str, OpenApiParameter.HEADER, response=[200, 201], description="the status URL"),
    OpenApiParameter("Retry-After", int, OpenApiParameter.HEADER, response=[429, 503], description="seconds"),
]
IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    location=OpenApiParameter.HEADER,
    required=False,
    description="1-255 printable ASCII characters; a repeat with the same body returns the original task (200)",
)


class TaskPages(PageNumberPagination):
    """DRF's page numbers (``?page=N`` or ``last``, 20 a page), with errors naming ``page``: 400 for a page that is
    not a whole number from 1, 404 (``detail``) for one past the last."""

    def get_page_number(self, request, paginator):
        page_number = request.query_params.get(self.page_query_param) or "1"
        if page_number in self.last_page_strings:  # "last"
            return paginator.num_pages
        if not re.fullmatch(r"[0-9]{1,9}", page_number, re.ASCII) or int(page_number) < 1:
            raise ValidationError({self.page_query_param: ["must be a whole number from 1 to 999999999"]})
        return page_number

    def paginate_queryset(self, queryset, request, view=None):
        try:
            return super().paginate_queryset(queryset, request, view)
        except NotFound as exc:
            pages = self.django_paginator_class(queryset, self.get_page_size(request)).num_pages
            raise NotFound(f"{self.page_query_param} is past the last page ({pages})") from exc


class VideoTaskViewSet(viewsets.GenericViewSet):
    """Submit, list, poll, fetch and cancel the caller's video tasks."""

    serializer_class = TaskStatusSerializer
    pagination_class = TaskPages
    lookup_field = "task_id"

    def get_queryset(self):
        return VideoTask.objects.filter(owner=self.request.user)

    def get_object(self) -> VideoTask:
        """The caller's task; malformed ids and other users' tasks are both a plain 404."""
        text = str(self.kwargs["task_id"])
        if not _CANONICAL_UUID.fullmatch(text):  # uuid.UUID() also takes braces, "urn:uuid:", other digits
            raise NotFound()
        task_id = uuid.UUID(text)
        task = selectors.owned_task(owner=self.request.user, task_id=task_id)
        if task is None:
            raise NotFound()
        return task

    def _submitted(self, submission: services.Submission) -> Response:
        task = submission.task
        message = "Task created successfully" if submission.created else "Existing task for this Idempotency-Key"
        body = TaskCreatedSerializer({"task_id": task.task_id, "status": task.status, "message": message}).data
        location = reverse("task-status", kwargs={"task_id": task.task_id})
        code = status.HTTP_201_CREATED if submission.created else status.HTTP_200_OK
        return Response(body, status=code, headers={"Location": location})

    @extend_schema(
        request=VideoRequestSerializer,
        parameters=[IDEMPOTENCY_KEY, *SUBMIT_HEADERS],
        responses={201: TaskCreatedSerializer, 200: TaskCreatedSerializer, **SUBMIT_ERRORS},
        summary="Submit a video task (JSON)",
    )
    @action(detail=False, methods=["post"], parser_classes=[UnicodeJSONParser])
    def submit_json(self, request):
        request_serializer = VideoRequestSerializer(data=request.data)
        request_serializer.is_valid(raise_exception=True)
        fingerprint = fingerprints.json_request(request.data)
        return self._submitted(self._submit(request_serializer.validated_data, fingerprint))

    @extend_schema(
        request={"multipart/form-data": VideoFormRequestSerializer},
        parameters=[IDEMPOTENCY_KEY, *SUBMIT_HEADERS],
        responses={201: TaskCreatedSerializer, 200: TaskCreatedSerializer, **SUBMIT_ERRORS},
        summary="Submit a video task (multipart, with an image_file for I2V)",
    )
    @action(detail=False, methods=["post"], parser_classes=[UploadMultiPartParser, FormParser])
    def submit_form(self, request):
        # Uploads over LIGHTX2V_MAX_UPLOAD_BYTES were refused with 413 while streaming (tasks_app.uploads).
        request_serializer = VideoFormRequestSerializer(data=request.data)
        request_serializer.is_valid(raise_exception=True)
        fingerprint = fingerprints.form_request(request.POST, request.FILES)
        return self._submitted(self._submit(request_serializer.validated_data, fingerprint))

    def _submit(self, validated: dict, request_fingerprint: str) -> services.Submission:
        params = dict(validated)
        image = params.pop("image")
        return services.task_submit(
            owner=self.request.user,
            params=params,
            image=image,
            idempotency_key=fingerprints.idempotency_key(self.request),
            request_fingerprint=request_fingerprint,
        )

    @extend_schema(
        parameters=[OpenApiParameter("status", enum=VideoTask.Status.values, required=False)],
        responses={200: TaskStatusSerializer(many=True), 400: FIELD_ERRORS, 404: ERROR_RESPONSE},
        summary="The caller's tasks, newest first",
    )
    def list(self, request):
        wanted_status = request.query_params.get("status") or None
        if wanted_status is not None and wanted_status not in VideoTask.Status.values:
            raise ValidationError({"status": [f"must be one of {', '.join(VideoTask.Status.values)}"]})
        page = self.paginate_queryset(selectors.tasks_of(owner=request.user, status=wanted_status))
        queued = [task for task in page if task.status == VideoTask.Status.SUBMITTED]
        context = {**self.get_serializer_context(), "queue_positions": selectors.queue_positions(tasks=queued)}
        return self.get_paginated_response(self.get_serializer(page, many=True, context=context).data)

    @extend_schema(responses={200: TaskStatusSerializer, 404: ERROR_RESPONSE}, summary="Poll a task")
    @action(detail=True, methods=["get"])
    def poll(self, request, task_id=None):
        return Response(self.get_serializer(self.get_object()).data)

    @extend_schema(
        responses={
            (200, "video/mp4"): MP4_RESPONSE, (206, "video/mp4"): MP4_RESPONSE,
            409: TaskStatusSerializer, 404: ERROR_RESPONSE, 410: ERROR_RESPONSE, 416: ERROR_RESPONSE,
        },  # fmt: skip
        summary="Download the finished video (409 until it succeeded; 410 if its file was removed since)",
    )
    @action(detail=True, methods=["get"])
    def result(self, request, task_id=None):
        task = self.get_object()
        if task.status != VideoTask.Status.SUCCEED:
            return Response(self.get_serializer(task).data, status=status.HTTP_409_CONFLICT)
        video = storage.resolve_public_path(task.file_path)
        if video is None:  # removed from storage since (by an operator, a bucket's lifecycle rule)
            return Response({"detail": "the video of this task is no longer stored"}, status=status.HTTP_410_GONE)
        return _stream_video(request, video)

    @extend_schema(
        request=None,
        responses={
            200: TaskStatusSerializer, 409: ERROR_RESPONSE, 404: ERROR_RESPONSE,
            405: OpenApiResponse(
                response=ERROR_RESPONSE.response, description="the id is `video`: that path is the submit"
            ),
        },  # fmt: skip
        summary="Cancel a submitted or running task",
    )
    def cancel(self, request, task_id=None):
        services.task_cancel(task=self.get_object())
        return Response(self.get_serializer(self.get_object()).data)  # read again: the run just ended

    @extend_schema(responses={200: QueueStatusSerializer}, summary="Tasks per status and live workers")
    @action(detail=False, methods=["get"])
    def queue_status(self, request):
        body = {"counts": selectors.status_counts(), "live_workers": selectors.live_worker_count()}
        return Response(QueueStatusSerializer(body).data)


class FileViewSet(viewsets.ViewSet):
    """Download of output files that belong to the caller's tasks."""

    @extend_schema(
        responses={
            (200, "video/mp4"): MP4_RESPONSE, (200, "image/jpeg"): POSTER_RESPONSE,
            (206, "video/mp4"): MP4_RESPONSE, 404: ERROR_RESPONSE, 416: ERROR_RESPONSE,
        },  # fmt: skip
        summary="Download a task's video or poster",
    )
    def download(self, request, file_path: str = ""):
        owned = (
            storage.is_well_formed_public_path(file_path)
            and VideoTask.objects.filter(Q(file_path=file_path) | Q(poster_path=file_path))
            .filter(owner=request.user, status=VideoTask.Status.SUCCEED)
            .exists()
        )
        found = storage.resolve_public_path(file_path) if owned else None
        if found is None:
            raise NotFound()
        return _stream_video(request, found)


def _stream_video(request, name: str):
    """A task's MP4, or its JPEG poster, from the outputs store; ``Range`` requests get 206."""
    return file_response(request, storage.outputs(), name, "image/jpeg" if name.endswith(".jpg") else "video/mp4")


SERVICE_STATUS = inline_serializer(
    "ServiceStatus",
    {"status": serializers.CharField(), "database": serializers.BooleanField(), "live_workers": serializers.IntegerField()},
)


class ServiceViewSet(viewsets.ViewSet):
    """Health and configuration; no token needed."""

    permission_classes = [AllowAny]
    authentication_classes: list = []

    @extend_schema(
        responses={200: SERVICE_STATUS, 503: SERVICE_STATUS},
        summary="Health: database reachable, live workers",
    )
    @action(detail=False, methods=["get"])
    def health(self, request):
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            workers = selectors.live_worker_count()
        except Exception:  # noqa: BLE001 - health reports any database failure as "down"
            return Response(
                {"status": "unavailable", "database": False, "live_workers": 0},
                status=status.HTTP_503_SERVICE_UNAVAILABLE,
            )
        return Response({"status": "ok", "database": True, "live_workers": workers})

    @extend_schema(responses={200: OpenApiTypes.OBJECT}, summary="Models, defaults and limits")
    @action(detail=False, methods=["get"])
    def metadata(self, request):
        return Response(
            {
                "version": SERVICE_VERSION,
                "models": {
                    "t2v": Path(settings.LIGHTX2V_MODEL_PATH).name or None,
                    "i2v": Path(settings.LIGHTX2V_I2V_MODEL_PATH).name or None,
                },
                # What a request that leaves a field out gets (sample_shift: at the default size; see its help).
                "defaults": {
                    **REQUEST_DEFAULTS, "fps": 16, "step_cache": settings.LIGHTX2V_INFERENCE_OPTIONS.cache,
                    "sample_shift": default_shift(
                        REQUEST_DEFAULTS["height"], REQUEST_DEFAULTS["width"], distilled=settings.LIGHTX2V_DISTILLED
                    ),
                },
                "loras": list_loras(settings.LIGHTX2V_LORA_DIR),
                "schedulers": {"available": list(SCHEDULERS), "configured": settings.LIGHTX2V_SCHEDULER or "model"},
                "resize_modes": list(RESIZE_MODES),
                "step_caches": {
                    "available": list(CACHE_KINDS), "default": settings.LIGHTX2V_INFERENCE_OPTIONS.cache,
                },
                "limits": {
                    "infer_steps": [1, 50], "video_duration": [1, settings.LIGHTX2V_MAX_DURATION],
                    "size": [16, 1280], "size_multiple": 16, "max_pixels": settings.LIGHTX2V_MAX_PIXELS,
                    "num_fragments": [1, 8], "guidance_scale": [1.0, 20.0], "prompt_chars": 2000,
                    "sample_shift": [0.5, 20.0], "lora_strength": [0.0, 2.0],
                    "max_upload_bytes": settings.LIGHTX2V_MAX_UPLOAD_BYTES,
                },
            }  # fmt: skip
        )
