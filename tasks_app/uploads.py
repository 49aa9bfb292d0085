"""Upload size enforcement while the multipart body streams in, before it is all read or stored.

A declared ``Content-Length`` over the limit is refused before the first byte is read; a body
without one (chunked) is cut off as soon as one file passes ``LIGHTX2V_MAX_UPLOAD_BYTES``.
Either way the client gets 413 naming ``image_file``.
"""
from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler

from .errors import PayloadTooLarge

# Room for the form's text fields and multipart boundaries on top of the file itself.
FORM_OVERHEAD_BYTES = 256 * 1024


def _too_large() -> PayloadTooLarge:
    return PayloadTooLarge(f"image_file must be at most {settings.LIGHTX2V_MAX_UPLOAD_BYTES} bytes")


class SizeLimitedUploadHandler(FileUploadHandler):
    """Passes chunks on to the next handler (memory, then temporary file) while counting them."""

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        if content_length and content_length > settings.LIGHTX2V_MAX_UPLOAD_BYTES + FORM_OVERHEAD_BYTES:
            raise _too_large()
        return None  # let the parser go on

    def new_file(self, *args, **kwargs):
        super().new_file(*args, **kwargs)
        self.received_bytes = 0

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        self.received_bytes += len(raw_data)
        if self.received_bytes > settings.LIGHTX2V_MAX_UPLOAD_BYTES:
            # Django calls upload_interrupted() only for StopUpload: without this the temporary
            # file the next handler wrote so far stays on disk until the request is garbage-collected.
            for handler in self.request.upload_handlers:
                if handler is not self:
                    handler.upload_interrupted()
            raise _too_large()
        return raw_data

    def file_complete(self, file_size: int):
        return None  # the next handler builds the file object
