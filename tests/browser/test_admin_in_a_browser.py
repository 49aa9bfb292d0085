"""The operator admin in headless Chromium: log in, filter failed tasks, retry one, watch a finished video."""
import shutil

import numpy as np
import pytest

from inference.encode import encode_mp4
from tasks_app import storage
from tasks_app.models import VideoTask

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture
def tasks(api, transactional_db, tmp_path):
    """A failed task and a succeeded one with a real MP4 and poster, as the worker leaves them."""
    failed_id = api.post("/v1/tasks/video", {"prompt": "a failed fox"}, format="json").json()["task_id"]
    done_id = api.post("/v1/tasks/video", {"prompt": "a finished fox"}, format="json").json()["task_id"]
    VideoTask.objects.filter(task_id=failed_id).update(status="failed", message="failed: boom", attempt_count=1)
    frames = np.random.default_rng(0).integers(0, 255, size=(17, 64, 64, 3), dtype=np.uint8)
    encode_mp4(frames, tmp_path / "video.mp4")
    file_path = storage.publish_output(tmp_path / "video.mp4", done_id, ".mp4")
    VideoTask.objects.filter(task_id=done_id).update(status="succeed", progress=1.0, file_path=file_path)
    return failed_id, done_id


def test_operator_filters_failed_tasks_retries_one_and_plays_a_finished_video(live_server, django_user_model, tasks):
    from playwright.sync_api import sync_playwright

    failed_id, done_id = tasks
    django_user_model.objects.create_superuser("operator", password="browser-test-pw")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(f"{live_server.url}/admin/login/")
        page.fill("#id_username", "operator")
        page.fill("#id_password", "browser-test-pw")
        page.click("input[type=submit]")
        page.wait_for_selector("#site-name")

        page.goto(f"{live_server.url}/admin/tasks_app/videotask/")
        page.click("#changelist-filter a[href*='status__exact=failed']")
        page.wait_for_url("**status__exact=failed**")
        rows = page.locator("#result_list tbody tr")
        assert rows.count() == 1 and failed_id in rows.first.inner_text()
        rows.first.locator("input.action-select").check()
        page.select_option("select[name=action]", "retry_tasks")
        page.click("button[name=index]")
        page.wait_for_selector("ul.messagelist")
        assert "Queued again 1 task(s)." in page.inner_text("ul.messagelist")

        page.goto(f"{live_server.url}/admin/tasks_app/videotask/{done_id}/change/")
        video = page.locator("video#task-video")
        assert video.count() == 1
        # Chromium fetched and parsed the MP4 (range requests against the admin's media view).
        page.wait_for_function("document.querySelector('video#task-video').readyState >= 1", timeout=15_000)
        duration = page.evaluate("document.querySelector('video#task-video').duration")
        browser.close()

    assert duration == pytest.approx(17 / 16, abs=0.1)
    assert VideoTask.objects.get(task_id=failed_id).status == "submitted"
