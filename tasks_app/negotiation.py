"""Content negotiation: an answer in a format the client asked for when there is one, else JSON.

DRF's default refuses a request whose ``Accept`` no renderer matches with 406. For this API that is
never useful: a player asking the result or a download for ``video/mp4`` must get the video (those
views answer with the file whatever the renderer), and a client asking for XML is better served by
a JSON answer, errors included, than by a 406 that tells it nothing about its task.
"""
from rest_framework.exceptions import NotAcceptable
from rest_framework.negotiation import DefaultContentNegotiation


class JsonUnlessAcceptable(DefaultContentNegotiation):
    """``DefaultContentNegotiation``, falling back to the first renderer (JSON) instead of a 406."""

    def select_renderer(self, request, renderers, format_suffix=None):
        try:
            return super().select_renderer(request, renderers, format_suffix)
        except NotAcceptable:
            return renderers[0], renderers[0].media_type
