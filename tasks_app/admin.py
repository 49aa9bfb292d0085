"""Operator views: tasks with status badges and progress bars, filters, search, retry/cancel, the video
player and input image on the task page, attempt history, webhook deliveries, tokens."""
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from . import services, storage, webhooks
from .errors import ServiceError
from .models import ApiToken, TaskAttempt, VideoTask, WebhookDelivery
from .ranges import file_response


class TaskAttemptInline(admin.TabularInline):
    """Each run of the task: worker, start, end, outcome, error."""

    model = TaskAttempt
    fields = ("number", "worker_name", "started_at", "finished_at", "outcome", "error")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


STATUS_COLOURS = {
    "submitted": "#6c757d", "running": "#0d6efd", "succeed": "#198754", "failed": "#dc3545", "cancelled": "#fd7e14",
}  # fmt: skip


@admin.register(VideoTask)
class VideoTaskAdmin(admin.ModelAdmin):
    list_display = (
        "task_id", "status_badge", "progress_bar", "task_type", "owner", "created_at", "attempt_count", "message",
    )  # fmt: skip
    list_filter = ("status", "task_type", "created_at", "owner")
    search_fields = ("prompt", "task_id", "owner__username")
    date_hierarchy = "created_at"
    actions = ("retry_tasks", "cancel_tasks")
    readonly_fields = ["video_player", "input_image_preview", *[f.name for f in VideoTask._meta.fields]]
    inlines = [TaskAttemptInline]

    @admin.display(description="status", ordering="status")
    def status_badge(self, task: VideoTask):
        colour = STATUS_COLOURS.get(task.status, "#6c757d")
        return format_html(
            '<span class="status-badge" style="background:{};color:#fff;padding:2px 8px;border-radius:8px">{}</span>',
            colour, task.status,
        )  # fmt: skip

    @admin.display(description="progress", ordering="progress")
    def progress_bar(self, task: VideoTask):
        return format_html(
            '<progress value="{}" max="100" title="{}%"></progress> {}%', round(task.progress * 100),
            round(task.progress * 100), round(task.progress * 100),
        )  # fmt: skip

    @admin.display(description="video")
    def video_player(self, task: VideoTask):
        if task.status != VideoTask.Status.SUCCEED or not task.file_path:
            return "—"
        poster = reverse("admin:tasks_app_videotask_media", args=[task.pk, "poster"]) if task.poster_path else ""
        return format_html(
            '<video id="task-video" controls preload="metadata" width="480" poster="{}" src="{}"></video>',
            poster, reverse("admin:tasks_app_videotask_media", args=[task.pk, "video"]),
        )  # fmt: skip

    @admin.display(description="input image")
    def input_image_preview(self, task: VideoTask):
        if not task.input_image:
            return "—"
        url = reverse("admin:tasks_app_videotask_media", args=[task.pk, "input"])
        return format_html('<img id="task-input-image" src="{}" style="max-width:320px">', url)

    def get_urls(self):
        media_view = self.admin_site.admin_view(self.media_view)
        media = path("<uuid:task_id>/media/<str:kind>/", media_view, name="tasks_app_videotask_media")
        return [media, *super().get_urls()]

    def media_view(self, request, task_id, kind: str):
        """Staff who may view tasks: a task's video (Range-capable), poster or input image."""
        task = VideoTask.objects.filter(pk=task_id).first()
        if task is None or kind not in ("video", "poster", "input"):
            raise Http404
        if not self.has_view_permission(request, task):
            raise PermissionDenied
        if kind == "input":
            store, found = storage.uploads(), storage.stored_input_image(task.input_image)
            content_type = "image/png"
        else:
            public = task.file_path if kind == "video" else task.poster_path
            store, found = storage.outputs(), storage.resolve_public_path(public) if public else None
            content_type = "video/mp4" if kind == "video" else "image/jpeg"
        if found is None:
            raise Http404
        return file_response(request, store, found, content_type)

    def has_add_permission(self, request) -> bool:
        return False  # tasks enter through the API, which validates them

    def _apply(self, request, queryset, transition, verb: str) -> None:
        done, refused = 0, 0
        for task in queryset:
            try:
                transition(task=task)
                done += 1
            except ServiceError:
                refused += 1
        self.message_user(request, f"{verb} {done} task(s).", messages.SUCCESS)
        if refused:
            self.message_user(request, f"{refused} task(s) were not in a state that allows it.", messages.WARNING)

    @admin.action(description="Retry selected failed/cancelled tasks")
    def retry_tasks(self, request, queryset):
        self._apply(request, queryset, services.task_retry, "Queued again")

    @admin.action(description="Cancel selected submitted/running tasks")
    def cancel_tasks(self, request, queryset):
        self._apply(request, queryset, services.task_cancel, "Cancelled")


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("prefix", "user", "name", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("user__username", "name", "prefix")
    readonly_fields = ("user", "prefix", "created_at", "last_used_at")
    fields = ("user", "name", "prefix", "created_at", "last_used_at", "revoked_at")
    actions = ("revoke_tokens",)

    @admin.action(description="Revoke selected tokens")
    def revoke_tokens(self, request, queryset):
        revoked = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {revoked} token(s).", messages.SUCCESS)

    def has_add_permission(self, request) -> bool:
        return False  # the raw key is shown once: create tokens with `manage.py create_api_token`


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    """Every webhook delivery with its attempts and last answer; re-send from here."""

    list_display = ("event", "task", "url", "attempts", "last_status_code", "delivered_at", "gave_up_at", "created_at")
    list_filter = ("event", "delivered_at", "gave_up_at")
    search_fields = ("task__task_id", "url")
    readonly_fields = [f.name for f in WebhookDelivery._meta.fields]
    actions = ("resend_deliveries",)

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Re-send selected deliveries")
    def resend_deliveries(self, request, queryset):
        self.message_user(request, f"Re-sending {webhooks.resend(queryset)} delivery(ies).", messages.SUCCESS)
