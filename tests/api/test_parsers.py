"""The multipart part-name watcher sees every part's name however the body is cut into reads."""
import io

import pytest

from tasks_app.parsers import _PartNames

BODY = (
    b"--bnd\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nname=\"decoy\" --bnd\r\r\n"
    b"--bnd\r\ncontent-type: image/png\r\nCONTENT-DISPOSITION: form-data; filename=\"caf\xe9\"; name=\"image_file\""
    b"\r\n\r\n\x89PNG--bn\r\n--bnd\r\nContent-Disposition: form-data; name=\"seed\"\r\n\r\n7\r\n"
    b"--bnd\r\nContent-Disposition: form-data; name = height ; filename=..\r\n\r\n64\r\n--bnd--\r\n"
)


@pytest.mark.parametrize("read_size", [1, 2, 3, 5, 8, 13, 29, 64, 4096])
def test_part_names_are_found_across_read_boundaries(read_size):
    watched = _PartNames(io.BytesIO(BODY), b"bnd")
    passed = b"".join(iter(lambda: watched.read(read_size), b""))
    assert passed == BODY  # a read-through: the parser gets the body unchanged
    assert watched.names == {"prompt", "image_file", "seed", "height"}
