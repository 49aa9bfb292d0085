"""Operator views: tasks with status badges and progress bars, filters, search, retry/cancel, the video
player and input image on the task page, attempt history, webhook deliveries, tokens."""
from collections import Counter

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


class OperatorAdmin(admin.ModelAdmin):
    """The base of this app's admins: filters from the query string are checked before they are run."""

    def lookup_allowed(self, lookup, value, request=None) -> bool:
        """Also refuse (400) a year outside the calendar (``?finished_at__year=99999`` was a 500)."""
        year = value.strip() if isinstance(value, str) else ""
        if lookup.endswith("__year") and year.lstrip("-").isdigit() and not 1 <= int(year) <= 9999:
            return False
        return super().lookup_allowed(lookup, value, request)


class ActionsOnlyAdmin(OperatorAdmin):
    """A model whose rows change only through its admin actions (each a ``services``/``webhooks``
    call): a row's page is read-only, since saving it would write back every column as loaded, over
    what a worker wrote meanwhile. The actions need the change permission, not just view."""

    def has_change_permission(self, request, obj=None) -> bool:
        return obj is None and super().has_change_permission(request)


STATUS_COLOURS = {
    "submitted": "#6c757d", "running": "#0d6efd", "succeed": "#198754", "failed": "#dc3545", "cancelled": "#fd7e14",
}  # fmt: skip


@admin.register(VideoTask)
class VideoTaskAdmin(ActionsOnlyAdmin):
    list_display = (
        "task_id", "status_badge", "progress_bar", "task_type", "owner", "created_at", "attempt_count", "message",
    )  # fmt: skip
    list_filter = ("status", "task_type", "created_at", ("owner", admin.RelatedOnlyFieldListFilter))
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
        """Run ``transition`` on each selected task; report how many it changed, and each reason
        for refusing the others with their count."""
        done, refusals = 0, Counter()
        for task in queryset:
            try:
                transition(task=task)
                done += 1
            except ServiceError as refused:
                refusals[refused.message] += 1
        if done:
            self.message_user(request, f"{verb} {done} task(s).", messages.SUCCESS)
        for reason, count in refusals.items():
            self.message_user(request, f"Not {verb.lower()}: {count} task(s): {reason}", messages.WARNING)

    @admin.action(description="Retry selected failed/cancelled tasks", permissions=["change"])
    def retry_tasks(self, request, queryset):
        self._apply(request, queryset, services.task_retry, "Queued again")

    @admin.action(description="Cancel selected submitted/running tasks", permissions=["change"])
    def cancel_tasks(self, request, queryset):
        self._apply(request, queryset, services.task_cancel, "Cancelled")


@admin.register(ApiToken)
class ApiTokenAdmin(OperatorAdmin):
    list_display = ("prefix", "user", "name", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("user__username", "name", "prefix")
    # A revocation is final: only the action sets revoked_at (clearing it would bring a leaked key back).
    readonly_fields = ("user", "prefix", "created_at", "last_used_at", "revoked_at")
    fields = ("user", "name", "prefix", "created_at", "last_used_at", "revoked_at")
    actions = ("revoke_tokens",)

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke_tokens(self, request, queryset):
        revoked = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {revoked} token(s).", messages.SUCCESS)

    def has_add_permission(self, request) -> bool:
        return False  # the raw key is shown once: create tokens with `manage.py create_api_token`


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(ActionsOnlyAdmin):
    """Every webhook delivery with its attempts and last answer; re-send from here."""

    list_display = ("event", "task", "url", "attempts", "last_status_code", "delivered_at", "gave_up_at", "created_at")
    list_filter = ("event", "delivered_at", "gave_up_at")
    search_fields = ("task__task_id", "url")
    readonly_fields = [f.name for f in WebhookDelivery._meta.fields]
    actions = ("resend_deliveries",)

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Re-send selected deliveries", permissions=["change"])
    def resend_deliveries(self, request, queryset):
        queued, stale = webhooks.resend(queryset)
        if queued:
            self.message_user(request, f"Re-sending {queued} delivery(ies).", messages.SUCCESS)
        if stale:
            self.message_user(
                request, f"Not re-sent: {stale} delivery(ies) report a state their task has left "
                "(only a task's newest delivery, of its current status, is sent again).", messages.WARNING,
            )  # fmt: skip
