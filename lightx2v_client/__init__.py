"""Command-line and Python client of the LightX2V video API (``python -m lightx2v_client --help``)."""
from .api import ApiError, Client, ServerUnreachable

__all__ = ["ApiError", "Client", "ServerUnreachable"]
