"""Worker-test helpers: an HTTP client of the live server, and task shapes that take known time."""
import pytest
import requests

from tests.conftest import wait_for

SMALL = {"height": 64, "width": 96, "video_duration": 1, "infer_steps": 4}  # well under a second
FINISHED = {"succeed", "failed", "cancelled"}


class HttpClient:
    """``requests`` against the live server, as a user with a Bearer token."""

    def __init__(self, base_url: str, raw_key: str):
        self.base_url = base_url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {raw_key}"

    def __getattr__(self, method):
        return lambda path, **kwargs: self.session.request(method.upper(), self.base_url + path, timeout=30, **kwargs)

    def poll_until_finished(self, task_id: str, timeout: float = 120) -> tuple[dict, list[float]]:
        """The final status body and every progress value seen on the way."""
        seen: list[float] = []

        def finished():
            body = self.get(f"/v1/tasks/{task_id}/status").json()
            seen.append(body["progress"])
            return body if body["status"] in FINISHED else None

        return wait_for(finished, timeout=timeout, what=f"task {task_id} to finish", interval=0.02), seen


@pytest.fixture
def http(live_server, make_api):
    return HttpClient(live_server.url, make_api("alice").raw_key)


def submit(client, body: dict) -> str:
    response = client.post("/v1/tasks/video", json=body)
    assert response.status_code == 201, response.text
    return response.json()["task_id"]
