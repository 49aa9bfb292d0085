"""Generation features end to end through the queue: long video, LoRA, guidance, posters and metadata."""
import numpy as np
import pytest

from inference.encode import encode_mp4, probe_mp4
from inference.generate import continuation_request, generate_frames
from tasks_app.models import VideoTask
from tasks_app.worker import _first_request, load_configured_pipeline
from tests.worker.conftest import submit

pytestmark = pytest.mark.worker

TINY = {"height": 64, "width": 64, "video_duration": 1, "infer_steps": 2, "seed": 11}


def _succeeded(http, task_id: str) -> dict:
    final, _ = http.poll_until_finished(task_id)
    assert final["status"] == "succeed", final["message"]
    return final


def test_three_fragments_make_one_video_with_continuous_seams(workers, http, tmp_path):
    workers.start(extra_env={"LIGHTX2V_STREAM_ENCODE": "on"})  # the GPU default: encoded while decoding
    task_id = submit(http, {"prompt": "a long walk", **TINY, "num_fragments": 3})
    final, seen = http.poll_until_finished(task_id)
    assert final["status"] == "succeed", final["message"]

    video = tmp_path / "long.mp4"
    video.write_bytes(http.get(f"/v1/tasks/{task_id}/result").content)
    assert probe_mp4(video)["frames"] == 3 * 16 * 1 + 1
    assert final["video_info"]["frames"] == 49 and final["video_info"]["fps"] == 16
    fragments = VideoTask.objects.get(task_id=task_id).run_stats["fragments"]
    assert fragments[0]["input_sha256"] is None  # fragment 1 is text to video
    for previous, current in zip(fragments, fragments[1:]):
        assert current["input_sha256"] == previous["last_frame_sha256"]  # conditioned on exactly the seam
    assert seen == sorted(seen)

    # The worker encoded while decoding, fragment by fragment: the same bytes as encoding the joined
    # fragments afterwards (each continuation's first frame repeats the seam, so it is dropped).
    request, joined = _first_request(VideoTask.objects.get(task_id=task_id)), []
    for index in range(3):
        frames = generate_frames(load_configured_pipeline(request.kind), request)
        joined.append(frames if index == 0 else frames[1:])
        request = continuation_request(request, frames)
    encode_mp4(np.concatenate(joined), tmp_path / "afterwards.mp4", fps=16)
    assert video.read_bytes() == (tmp_path / "afterwards.mp4").read_bytes()


def test_loras_change_the_video_and_leave_the_base_weights_untouched(workers, http):
    workers.start()
    fresh = _succeeded(http, submit(http, {"prompt": "a lighthouse", **TINY}))  # before any LoRA
    alpha = _succeeded(http, submit(http, {"prompt": "a lighthouse", **TINY, "lora_name": "alpha"}))
    beta = _succeeded(http, submit(http, {"prompt": "a lighthouse", **TINY, "lora_name": "beta"}))
    after = _succeeded(http, submit(http, {"prompt": "a lighthouse", **TINY}))

    videos = [http.get(f"/v1/tasks/{final['task_id']}/result").content for final in (fresh, alpha, beta, after)]
    assert len({videos[0], videos[1], videos[2]}) == 3
    assert videos[3] == videos[0]  # byte for byte: the LoRAs left nothing behind
    assert len({final["attempts"][0]["worker_name"] for final in (fresh, alpha, beta, after)}) == 1


def test_guidance_runs_cfg_only_above_one(workers, http):
    workers.start()
    plain = _succeeded(http, submit(http, {"prompt": "rain", **TINY}))
    cfg = _succeeded(http, submit(http, {"prompt": "rain", **TINY, "guidance_scale": 5.0, "negative_prompt": "sun"}))

    calls = {
        final["task_id"]: VideoTask.objects.get(task_id=final["task_id"]).run_stats["fragments"][0]["transformer_calls"]
        for final in (plain, cfg)
    }
    assert calls[plain["task_id"]] == TINY["infer_steps"]  # one transformer pass per step
    assert calls[cfg["task_id"]] == 2 * TINY["infer_steps"]  # conditional + unconditional
    results = [http.get(f"/v1/tasks/{final['task_id']}/result").content for final in (plain, cfg)]
    assert results[0] != results[1]


def test_a_request_picks_its_step_cache_and_the_next_runs_without(workers, http):
    workers.start()
    request = {"prompt": "waves", **TINY, "infer_steps": 4}  # taylorseer computes steps 0-2, predicts step 3
    tasks = [_succeeded(http, submit(http, {**request, **cache})) for cache in ({}, {"step_cache": "taylorseer"}, {})]

    assert [task["step_cache"] for task in tasks] == ["none", "taylorseer", "none"]
    plain, cached, after = (http.get(f"/v1/tasks/{task['task_id']}/result").content for task in tasks)
    assert cached != plain  # lossy: the predicted step
    assert after == plain  # the cache came off again for the next task


def test_a_finished_task_has_a_poster_and_video_metadata(workers, http):
    workers.start()
    final = _succeeded(http, submit(http, {"prompt": "a poster", **TINY}))

    poster = http.get(final["poster_url"].removeprefix(http.base_url))
    assert poster.status_code == 200 and poster.headers["Content-Type"] == "image/jpeg"
    assert poster.content[:3] == b"\xff\xd8\xff"
    info = final["video_info"]
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (64, 64, 17, 16)
    assert info["size_bytes"] == len(http.get(f"/v1/tasks/{final['task_id']}/result").content)
    assert info["duration_s"] == pytest.approx(17 / 16)
    metrics = http.get("/metrics").text  # the live server is on loopback
    assert 'lightx2v_tasks{status="succeed"} 1.0' in metrics and "lightx2v_task_duration_seconds_count 1.0" in metrics
    step_line = next(line for line in metrics.splitlines() if line.startswith("lightx2v_recent_step_seconds "))
    assert float(step_line.split()[1]) > 0
