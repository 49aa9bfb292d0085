from django.apps import AppConfig


class TasksAppConfig(AppConfig):
    """Video tasks. Nothing here touches CUDA: workers are forked after start-up."""

    name = "tasks_app"
    verbose_name = "Video tasks"
    default_auto_field = "django.db.models.BigAutoField"
