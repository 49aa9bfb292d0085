from django.apps import AppConfig


class TasksAppConfig(AppConfig):
    """Video tasks. Nothing here touches CUDA: workers are forked after start-up."""

    name = "tasks_app"
    verbose_name = "Video tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django_q.signals import post_spawn

        from . import worker_process

        # Runs inside each spawned worker process, not here in the parent.
        post_spawn.connect(worker_process.start, dispatch_uid="lightx2v-worker-process")
