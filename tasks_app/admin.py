"""Operator views: every task with its progress, filters, search, and retry/cancel actions."""
from django.contrib import admin, messages
from django.utils import timezone

from . import services, webhooks
from .errors import ServiceError
from .models import ApiToken, TaskAttempt, VideoTask, WebhookDelivery


class TaskAttemptInline(admin.TabularInline):
    """Each run of the task: worker, start, end, outcome, error."""

    model = TaskAttempt
    fields = ("number", "worker_name", "started_at", "finished_at", "outcome", "error")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(VideoTask)
class VideoTaskAdmin(admin.ModelAdmin):
    list_display = ("task_id", "status", "progress", "task_type", "owner", "created_at", "attempt_count", "message")
    list_filter = ("status", "task_type", "created_at", "owner")
    search_fields = ("prompt", "task_id", "owner__username")
    date_hierarchy = "created_at"
    actions = ("retry_tasks", "cancel_tasks")
    readonly_fields = [f.name for f in VideoTask._meta.fields]
    inlines = [TaskAttemptInline]

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
