from django.apps import AppConfig


def _on_worker_spawn(**signal_kwargs) -> None:
    from .worker import on_worker_spawn

    on_worker_spawn(**signal_kwargs)


class TasksAppConfig(AppConfig):
    """Video tasks. Nothing here touches CUDA: workers are forked after start-up."""

    name = "tasks_app"
    verbose_name = "Video tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_delete
        from django_q.signals import post_spawn

        from .models import VideoTask
        from .retention import remove_files_of_deleted_task

        post_delete.connect(remove_files_of_deleted_task, sender=VideoTask, dispatch_uid="lightx2v-task-files")

        # Runs inside each spawned worker process, not here in the parent (the receiver imports torch).
        post_spawn.connect(_on_worker_spawn, dispatch_uid="lightx2v-worker-spawn")
