"""The service's data: a ``VideoTask`` per request and the API tokens that own them.

A ``VideoTask`` row is the single source of truth for a job. Its status moves only through
``tasks_app.services``; everything else reads it.
"""
import hashlib
import secrets
import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class VideoTask(models.Model):
    class Status(models.TextChoices):
        SUBMITTED = "submitted"
        RUNNING = "running"
        SUCCEED = "succeed"
        FAILED = "failed"
        CANCELLED = "cancelled"

    class TaskType(models.TextChoices):
        T2V = "t2v", "text to video"
        I2V = "i2v", "image to video"

    FINISHED_STATUSES = (Status.SUCCEED, Status.FAILED, Status.CANCELLED)

    task_id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="video_tasks")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.SUBMITTED)
    progress = models.FloatField(default=0.0, help_text="0.0-1.0, never decreases, 1.0 once succeeded")
    message = models.CharField(max_length=500, blank=True)
    task_type = models.CharField(max_length=3, choices=TaskType.choices, default=TaskType.T2V)

    # The request, as used (the seed is drawn at submit time when the client gave none).
    prompt = models.TextField()
    negative_prompt = models.TextField(blank=True)
    image_path = models.CharField(max_length=1024, blank=True, help_text="the client's image_path; only the header of a data: URL")
    input_image = models.CharField(
        max_length=255, blank=True, help_text="stored input image, relative to LIGHTX2V_UPLOAD_ROOT"
    )
    infer_steps = models.PositiveSmallIntegerField(default=4)
    video_duration = models.PositiveSmallIntegerField(default=5)
    seed = models.BigIntegerField()
    height = models.PositiveIntegerField(default=480)
    width = models.PositiveIntegerField(default=832)
    num_fragments = models.PositiveSmallIntegerField(default=1)
    guidance_scale = models.FloatField(default=1.0)
    sample_shift = models.FloatField(default=5.0, help_text="flow shift of the sampler, as used")
    lora_name = models.CharField(max_length=128, blank=True, help_text="a LoRA in LIGHTX2V_LORA_DIR, or none")
    lora_strength = models.FloatField(default=1.0)
    resize_mode = models.CharField(
        max_length=16, default="adaptive", help_text="how an I2V image meets the size: adaptive | fixed_shape"
    )
    step_cache = models.CharField(
        max_length=16, default="none", help_text="step cache used (lossy speed-up): none | first_block | taylorseer"
    )

    callback_url = models.URLField(
        max_length=2000, blank=True, help_text="POSTed a signed JSON body on every terminal state"
    )

    # The run.
    file_path = models.CharField(max_length=255, blank=True, help_text='e.g. "outputs/videos/<task_id>.mp4"')
    poster_path = models.CharField(max_length=255, blank=True, help_text='e.g. "outputs/videos/<task_id>.jpg"')
    video_info = models.JSONField(
        default=dict, blank=True, help_text="the finished MP4: frames, fps, duration_s, width, height, size_bytes"
    )
    error = models.TextField(blank=True, help_text="the failure reason, for operators")
    attempt_count = models.PositiveIntegerField(default=0, help_text="how many times a worker claimed it")
    lost_runs = models.PositiveIntegerField(
        default=0, help_text="runs whose worker died since it was submitted or retried (LIGHTX2V_MAX_ATTEMPTS fails it)"
    )
    worker_name = models.CharField(
        max_length=255, blank=True, help_text="host:pid of the worker that holds (or last held) the lease"
    )
    run_stats = models.JSONField(default=dict, blank=True, help_text="timings and pipeline-cache counters")
    created_at = models.DateTimeField(auto_now_add=True)
    queued_at = models.DateTimeField(default=timezone.now, help_text="when it (re-)entered the queue")
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(
        null=True, blank=True, help_text="last sign of life of the running worker; its lease ends LIGHTX2V_LEASE_S later"
    )
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # The worker's claim query: oldest submitted first.
            models.Index(fields=["queued_at"], condition=Q(status="submitted"), name="videotask_queue_idx"),
            models.Index(fields=["owner", "-created_at"], name="videotask_owner_idx"),
            models.Index(fields=["status"], name="videotask_status_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.task_id} ({self.status})"

    @property
    def is_finished(self) -> bool:
        return self.status in self.FINISHED_STATUSES

    @property
    def frames_per_fragment(self) -> int:
        return 16 * self.video_duration + 1


class IdempotencyKey(models.Model):
    """A client's ``Idempotency-Key`` for one submit: the same key and body return ``task`` again.

    ``request_fingerprint`` is the SHA-256 of the canonical request body; a key is live for
    ``LIGHTX2V_IDEMPOTENCY_TTL_S`` after ``created_at`` and then may be reused for a new task.
    """

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="idempotency_keys")
    key = models.CharField(max_length=255)
    request_fingerprint = models.CharField(max_length=64)
    task = models.ForeignKey(VideoTask, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["owner", "key"], name="idempotency_key_per_owner")]

    def __str__(self) -> str:
        return f"{self.key} -> {self.task_id}"


class TaskAttempt(models.Model):
    """One run of a task by one worker: who, when, and how it ended (``outcome``)."""

    class Outcome(models.TextChoices):
        RUNNING = "running"
        SUCCEED = "succeed"
        FAILED = "failed"
        CANCELLED = "cancelled"
        TIMED_OUT = "timed_out"
        LOST = "lost", "lost (worker stopped heartbeating)"
        HANDED_BACK = "handed_back", "handed back (worker shutting down)"

    task = models.ForeignKey(VideoTask, on_delete=models.CASCADE, related_name="attempt_records")
    number = models.PositiveIntegerField(help_text="1 for the first run; equals the task's attempt_count when claimed")
    worker_name = models.CharField(max_length=255)
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices, default=Outcome.RUNNING)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["task", "number"]
        constraints = [models.UniqueConstraint(fields=["task", "number"], name="one_record_per_attempt")]

    def __str__(self) -> str:
        return f"{self.task_id} #{self.number} {self.outcome}"


class WebhookSecret(models.Model):
    """The key a user's webhook deliveries are signed with (HMAC-SHA256); see ``tasks_app.webhooks``."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="webhook_secret")
    secret = models.CharField(max_length=64, default=secrets.token_hex)
    created_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"webhook secret of {self.user}"


class WebhookDelivery(models.Model):
    """One terminal-state notification of a task to its ``callback_url``, retried until delivered."""

    task = models.ForeignKey(VideoTask, on_delete=models.CASCADE, related_name="webhook_deliveries")
    url = models.URLField(max_length=2000)
    event = models.CharField(max_length=32, help_text='e.g. "task.succeed"')
    payload = models.JSONField()
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True)
    gave_up_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                condition=Q(delivered_at__isnull=True, gave_up_at__isnull=True),
                name="webhook_due_idx",
            )
        ]

    def __str__(self) -> str:
        return f"{self.event} {self.task_id} -> {self.url}"


def hash_token(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


class ApiToken(models.Model):
    """A bearer token. Only its SHA-256 is stored; the raw key is shown once, at creation."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(max_length=8, editable=False, help_text="first characters, to tell tokens apart")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"

    @classmethod
    def issue(cls, *, user, name: str = "") -> tuple["ApiToken", str]:
        """Create a token for ``user``; returns the row and the raw key (not recoverable later).

        The key never begins with "-", which command lines (``revoke_api_token``) read as an option.
        """
        raw_key = secrets.token_urlsafe(32)
        while raw_key.startswith("-"):
            raw_key = secrets.token_urlsafe(32)
        token = cls.objects.create(user=user, name=name, key_hash=hash_token(raw_key), prefix=raw_key[:8])
        return token, raw_key
