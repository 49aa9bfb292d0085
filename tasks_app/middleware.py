"""Request checks that hold for every URL, before any view runs."""
from django.http import JsonResponse


def refuse_nul_in_query(get_response):
    """A query string holding a NUL character (``%00``) is a 400: PostgreSQL cannot compare text with
    one, so a filter or search carrying it (the admin's, say) would otherwise end in a 500."""

    def middleware(request):
        if any("\x00" in key or any("\x00" in value for value in values) for key, values in request.GET.lists()):
            return JsonResponse({"detail": "The query string must not contain NUL (%00) characters."}, status=400)
        return get_response(request)

    return middleware


def api_paths_without_trailing_slash(get_response):
    """``/v1/tasks/video/`` is ``/v1/tasks/video``: the API's paths take a trailing slash as clients of
    the original server (which redirected) send it, answered in place so a POST keeps its body."""

    def middleware(request):
        path = request.path_info
        if path.startswith("/v1/") and path.endswith("/") and not path.endswith("//"):
            request.path_info = path[:-1]
        return get_response(request)

    return middleware
