"""Request validation and response shapes of the public API (../shared/API.md).

Unknown request fields are ignored. Every rule failure is a 400 naming the field.
"""
import math
import uuid
from datetime import datetime

from django.conf import settings
from django.urls import reverse
from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from inference.images import RESIZE_MODES as INFERENCE_RESIZE_MODES
from inference.images import fit_size
from inference.lora import MAX_LORA_STRENGTH, list_loras
from inference.options import CACHE_KINDS
from inference.sampling import default_shift

from . import images, selectors, storage, webhooks
from .models import TaskAttempt, VideoTask
from .services import MAX_SEED

# The API offers inference's fitting rules except "stretch" (which distorts the image).
RESIZE_MODES = tuple(mode for mode in INFERENCE_RESIZE_MODES if mode != "stretch")
PROMPT_MAX_CHARS = 2000
IMAGE_PATH_MAX_CHARS = VideoTask._meta.get_field("image_path").max_length
SIZE_STEP = 16
SIZE_MIN, SIZE_MAX = 16, 1280


class StrictIntegerField(serializers.IntegerField):
    """An integer that refuses booleans and non-integral numbers (``true`` or ``4.5`` are not 4)."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or (isinstance(data, float) and not data.is_integer()):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictCharField(serializers.CharField):
    """Text that must arrive as a string: DRF's CharField turns ``5`` into "5" and ``1e400`` into "inf"."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class FiniteFloatField(serializers.FloatField):
    def to_internal_value(self, data):
        if isinstance(data, bool):
            self.fail("invalid")
        value = super().to_internal_value(data)
        if not math.isfinite(value):
            self.fail("invalid")
        return value


STEP_CACHE_HELP = (
    "lossy speed-up: skip transformer work on steps like the previous ones (taylorseer computes 3 of 4 steps at "
    "the default 4, 5 of 12); left out: the server's LIGHTX2V_CACHE (see /v1/service/metadata step_caches)"
)


def _size_field(default: int) -> StrictIntegerField:
    return StrictIntegerField(default=default, min_value=SIZE_MIN, max_value=SIZE_MAX)


class VideoRequestSerializer(serializers.Serializer):
    """The JSON submit body. ``validated_data`` holds model fields plus ``image`` (a PIL image or None)."""

    prompt = StrictCharField(max_length=PROMPT_MAX_CHARS, trim_whitespace=True)
    negative_prompt = StrictCharField(
        max_length=PROMPT_MAX_CHARS, required=False, allow_blank=True, default=""
    )
    image_path = StrictCharField(
        required=False,
        allow_blank=True,
        default="",
        trim_whitespace=True,
        help_text="I2V input: a file inside LIGHTX2V_INPUT_ROOTS or a data:image/...;base64, URL "
        "(the task then shows only the URL's header)",
    )
    infer_steps = StrictIntegerField(default=4, min_value=1, max_value=50)
    video_duration = StrictIntegerField(default=5, min_value=1, help_text="seconds; 16 frames per second")
    seed = StrictIntegerField(required=False, allow_null=True, default=None, min_value=0, max_value=MAX_SEED)
    height = _size_field(480)
    width = _size_field(832)
    num_fragments = StrictIntegerField(default=1, min_value=1, max_value=8)
    guidance_scale = FiniteFloatField(
        default=1.0, min_value=1.0, max_value=20.0, help_text="1.0 = no CFG (distilled model); >1 runs CFG"
    )
    sample_shift = FiniteFloatField(
        required=False, allow_null=True, default=None, min_value=0.5, max_value=20.0,
        help_text="flow shift; default 5 for the distilled model, else 3 up to 480p and 5 above",
    )  # fmt: skip
    lora_name = StrictCharField(
        required=False, allow_blank=True, default="", max_length=128, help_text="one of /v1/service/metadata loras"
    )
    callback_url = serializers.URLField(
        required=False, allow_blank=True, default="", max_length=2000,
        help_text="POSTed a signed JSON body (X-LightX2V-Signature) when the task succeeds, fails or is cancelled",
    )  # fmt: skip
    lora_strength = FiniteFloatField(default=1.0, min_value=0.0, max_value=MAX_LORA_STRENGTH)
    resize_mode = serializers.ChoiceField(
        choices=RESIZE_MODES, default="adaptive",
        help_text="I2V: adaptive keeps the image's aspect ratio at the requested area (sides multiples of 16); "
        "fixed_shape crops the centre to exactly height x width",
    )  # fmt: skip

    step_cache = serializers.ChoiceField(
        choices=CACHE_KINDS, required=False, allow_null=True, default=None, help_text=STEP_CACHE_HELP
    )

    def validate_video_duration(self, value: int) -> int:
        if value > settings.LIGHTX2V_MAX_DURATION:
            raise serializers.ValidationError(f"must be at most {settings.LIGHTX2V_MAX_DURATION} seconds")
        return value

    def validate_height(self, value: int) -> int:
        return _multiple_of_16(value)

    def validate_width(self, value: int) -> int:
        return _multiple_of_16(value)

    def validate_image_path(self, value: str) -> str:
        """The image is decoded here; a data URL is recorded by its header (the image itself is stored)."""
        if not value:
            return value
        self._image_field = "image_path"
        if value.lower().startswith("data:"):
            self._input_image = _or_field_error(images.decode_data_url, value)
            return value[: value.index(",") + 1]
        if len(value) > IMAGE_PATH_MAX_CHARS:
            raise serializers.ValidationError(f"must be at most {IMAGE_PATH_MAX_CHARS} characters")
        resolved = storage.resolve_input_path(value)
        if resolved is None:
            raise serializers.ValidationError("must name an existing file inside the configured input folders")
        self._input_image = _or_field_error(images.load_image_file, resolved)
        return value

    def validate_callback_url(self, value: str) -> str:
        if value:
            try:
                webhooks.check_callback_url(value)
            except webhooks.CallbackRefused as exc:
                raise serializers.ValidationError(str(exc)) from exc
        return value

    def validate_lora_name(self, value: str) -> str:
        if value and value not in list_loras(settings.LIGHTX2V_LORA_DIR):
            available = ", ".join(list_loras(settings.LIGHTX2V_LORA_DIR)) or "none"
            raise serializers.ValidationError(f"unknown LoRA; available: {available}")
        return value

    def validate(self, attrs):
        if attrs["height"] * attrs["width"] > settings.LIGHTX2V_MAX_PIXELS:
            raise serializers.ValidationError(
                {"height": [f"height x width must be at most {settings.LIGHTX2V_MAX_PIXELS} pixels"]}
            )
        attrs["image"] = getattr(self, "_input_image", None)
        needs_i2v = attrs["image"] is not None or attrs["num_fragments"] > 1
        if needs_i2v and not settings.LIGHTX2V_I2V_MODEL_PATH:
            field = getattr(self, "_image_field", "num_fragments")  # the field that brought the image
            raise serializers.ValidationError({field: ["this server has no image-to-video model configured"]})
        if attrs["image"] is not None:
            attrs["height"], attrs["width"] = fit_size(
                attrs["image"].width, attrs["image"].height,
                height=attrs["height"], width=attrs["width"], resize_mode=attrs["resize_mode"],
            )  # fmt: skip
        if not attrs["step_cache"]:
            attrs["step_cache"] = settings.LIGHTX2V_INFERENCE_OPTIONS.cache
        if attrs["sample_shift"] is None:
            attrs["sample_shift"] = default_shift(attrs["height"], attrs["width"], distilled=settings.LIGHTX2V_DISTILLED)
        return attrs


class VideoFormRequestSerializer(VideoRequestSerializer):
    """The multipart submit body: the JSON fields plus an uploaded ``image_file``."""

    image_file = serializers.FileField(required=False, help_text="PNG, JPEG or WebP, at most 20 MiB")
    # A form field cannot carry null: leave these out (or empty) for the defaults.
    seed = StrictIntegerField(required=False, default=None, min_value=0, max_value=MAX_SEED)
    sample_shift = FiniteFloatField(required=False, default=None, min_value=0.5, max_value=20.0)
    step_cache = serializers.ChoiceField(
        choices=CACHE_KINDS, required=False, allow_blank=True, default=None, help_text=STEP_CACHE_HELP
    )

    def validate_image_file(self, upload):
        # Oversized uploads were already refused with 413 by the view, before decoding.
        self._input_image = _or_field_error(images.decode_image, upload.file)
        self._image_field = "image_file"
        return upload

    def validate(self, attrs):
        if attrs.get("image_file") and attrs.get("image_path"):
            raise serializers.ValidationError({"image_file": ["send image_file or image_path, not both"]})
        attrs.pop("image_file", None)
        return super().validate(attrs)


def _multiple_of_16(value: int) -> int:
    if value % SIZE_STEP:
        raise serializers.ValidationError(f"must be a multiple of {SIZE_STEP}")
    return value


def _or_field_error(decode, source):
    try:
        return decode(source)
    except images.InvalidImage as exc:
        raise serializers.ValidationError(str(exc)) from exc


class TaskCreatedSerializer(serializers.Serializer):
    task_id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=VideoTask.Status.choices)
    message = serializers.CharField()


class TaskAttemptSerializer(serializers.ModelSerializer):
    class Meta:
        model = TaskAttempt
        fields = ["number", "worker_name", "started_at", "finished_at", "outcome", "error"]
        read_only_fields = fields


class TaskStatusSerializer(serializers.ModelSerializer):
    """A task as its owner sees it: state, progress, the parameters as used, its runs, and where the video is."""

    attempts = TaskAttemptSerializer(source="attempt_records", many=True, read_only=True)
    callback_url = serializers.CharField(read_only=True, help_text='"" when none was given')
    resize_mode = serializers.ChoiceField(choices=RESIZE_MODES, read_only=True)
    step_cache = serializers.ChoiceField(choices=CACHE_KINDS, read_only=True)
    video_info = serializers.DictField(read_only=True, help_text="frames, fps, duration_s, width, height, size_bytes")
    run_stats = serializers.DictField(read_only=True, help_text="timings and counters of the last run")
    queue_position = serializers.SerializerMethodField()
    result_url = serializers.SerializerMethodField()
    poster_url = serializers.SerializerMethodField()
    eta_s = serializers.SerializerMethodField()

    class Meta:
        model = VideoTask
        fields = [
            "task_id", "status", "progress", "message", "task_type",
            "prompt", "negative_prompt", "image_path", "infer_steps", "video_duration", "seed",
            "height", "width", "num_fragments", "guidance_scale", "sample_shift", "lora_name", "lora_strength",
            "resize_mode", "step_cache", "callback_url",
            "created_at", "started_at", "finished_at", "attempt_count", "attempts",
            "queue_position", "eta_s", "file_path", "result_url", "poster_url", "video_info", "run_stats",
        ]  # fmt: skip
        read_only_fields = fields

    def to_representation(self, task: VideoTask) -> dict:
        """What DRF's field-by-field rendering gives (a test holds the two equal), without building
        the fields for every instance: a status poll is the hottest request of the service."""
        position = self.get_queue_position(task)
        body = {}
        for name in self.Meta.fields:
            if name == "attempts":
                body[name] = [
                    {field: _plain(getattr(attempt, field)) for field in TaskAttemptSerializer.Meta.fields}
                    for attempt in attempts_of(task)
                ]
            elif name == "queue_position":
                body[name] = position
            elif name == "eta_s":
                body[name] = selectors.eta_seconds(task=task, position=position)
            elif name in ("result_url", "poster_url"):
                body[name] = getattr(self, f"get_{name}")(task)
            else:
                body[name] = _plain(getattr(task, name))
        return body

    @extend_schema_field(serializers.IntegerField(allow_null=True, help_text="1 = next; null unless submitted"))
    def get_queue_position(self, task: VideoTask) -> int | None:
        """Looked up in the context's ``queue_positions`` (a list's page: one query) when it has them."""
        if task.status != VideoTask.Status.SUBMITTED:
            return None
        positions = self.context.get("queue_positions")
        return positions.get(task.pk) if positions is not None else selectors.queue_position(task=task)

    @extend_schema_field(serializers.FloatField(allow_null=True, help_text="estimated seconds until finished"))
    def get_eta_s(self, task: VideoTask) -> float | None:
        return selectors.eta_seconds(task=task)

    @extend_schema_field(serializers.URLField(allow_null=True, help_text="a JPEG frame of the video"))
    def get_poster_url(self, task: VideoTask) -> str | None:
        if task.status != VideoTask.Status.SUCCEED or not task.poster_path:
            return None
        return self._absolute(reverse("file-download", kwargs={"file_path": task.poster_path}))

    @extend_schema_field(serializers.URLField(allow_null=True))
    def get_result_url(self, task: VideoTask) -> str | None:
        if task.status != VideoTask.Status.SUCCEED:
            return None
        return self._absolute(reverse("task-result", kwargs={"task_id": task.task_id}))

    def _absolute(self, url: str) -> str:
        request = self.context.get("request")
        return request.build_absolute_uri(url) if request else url


def attempts_of(task: VideoTask):
    """The task's attempts in order: as ``selectors.owned_task`` loaded them, else from the database."""
    loaded = getattr(task, "loaded_attempts", None)
    return loaded if loaded is not None else task.attempt_records.all()


def _plain(value):
    """A model value as DRF renders it: UUIDs as text, datetimes as ISO 8601 in the current zone ("Z" for UTC)."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        text = timezone.localtime(value).isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    return value


class QueueStatusSerializer(serializers.Serializer):
    counts = serializers.DictField(child=serializers.IntegerField(), help_text="tasks per status")
    live_workers = serializers.IntegerField()
