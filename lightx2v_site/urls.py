"""URL map: the public API under /v1 (../shared/API.md), schema and docs, admin."""
from django.contrib import admin
from django.urls import path, re_path
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularRedocView, SpectacularSwaggerView

from tasks_app.errors import json_not_found, read_only
from tasks_app.metrics import metrics_view
from tasks_app.views import FileViewSet, ServiceViewSet, VideoTaskViewSet


def routed(viewset, mapping: dict[str, str]):
    """``viewset.as_view(mapping)`` with each action's own options (e.g. ``parser_classes``), as a router would."""
    initkwargs: dict = {}
    for action_name in mapping.values():
        initkwargs.update(getattr(getattr(viewset, action_name), "kwargs", {}))
    return viewset.as_view(mapping, **initkwargs)


def tasks(mapping: dict[str, str]):
    return routed(VideoTaskViewSet, mapping)


urlpatterns = [
    path("v1/tasks/video", tasks({"post": "submit_json"}), name="task-submit"),
    path("v1/tasks/video/form", tasks({"post": "submit_form"}), name="task-submit-form"),
    path("v1/tasks", tasks({"get": "list"}), name="task-list"),
    path("v1/tasks/queue/status", tasks({"get": "queue_status"}), name="queue-status"),
    path("v1/tasks/<str:task_id>/status", tasks({"get": "poll"}), name="task-status"),
    path("v1/tasks/<str:task_id>/result", tasks({"get": "result"}), name="task-result"),
    path("v1/tasks/<str:task_id>", tasks({"delete": "cancel"}), name="task-cancel"),
    path("v1/files/download/<path:file_path>", routed(FileViewSet, {"get": "download"}), name="file-download"),
    path("v1/service/status", routed(ServiceViewSet, {"get": "health"}), name="service-status"),
    path("v1/service/metadata", routed(ServiceViewSet, {"get": "metadata"}), name="service-metadata"),
    path("openapi.json", SpectacularJSONAPIView.as_view(), name="openapi-schema"),
    path("docs", read_only(SpectacularSwaggerView.as_view(url_name="openapi-schema")), name="swagger-ui"),
    path("redoc", read_only(SpectacularRedocView.as_view(url_name="openapi-schema")), name="redoc"),
    path("metrics", metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    # Any other URL: the JSON 404 (handler404 answers only with DEBUG off; with it on, Django's HTML page).
    re_path(r"^(?!admin(/|$)|static/)", json_not_found),
]

handler400 = "tasks_app.errors.json_bad_request"
handler404 = "tasks_app.errors.json_not_found"
handler500 = "tasks_app.errors.json_server_error"
