"""Streaming encode: frames handed on while the VAE decodes them, and an MP4 written chunk by chunk.

Off the CPU the worker encodes the MP4 on its own thread as the VAE decodes (``generate_frames(on_frames=)``
feeding a ``BackgroundMp4Writer``; ``LIGHTX2V_STREAM_ENCODE``); these tests hold that to the same frames
and the same bytes as decoding everything first and encoding afterwards.
"""

import os

import numpy as np
import pytest

from inference.encode import BackgroundMp4Writer, Mp4Writer, encode_mp4, probe_mp4
from inference.generate import generate_frames
from inference.options import InferenceOptions
from inference.pipelines import load_pipeline
from tests.inference.test_inference_generate import gradient_image, small_request


class StopFromFrames(Exception):
    pass


def sample_frames(count: int = 17, height: int = 48, width: int = 64) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_frames_are_handed_on_per_decoded_latent_frame_and_equal_the_returned_video(t2v_pipe, i2v_pipe, kind):
    pipe, image = (t2v_pipe, None) if kind == "t2v" else (i2v_pipe, gradient_image())
    chunks = []
    frames = generate_frames(pipe, small_request(image=image), on_frames=chunks.append)
    assert [len(chunk) for chunk in chunks] == [1, 4, 4, 4, 4]  # 17 frames = 5 latent frames
    np.testing.assert_array_equal(np.concatenate(chunks), frames)
    np.testing.assert_array_equal(generate_frames(pipe, small_request(image=image)), frames)  # nothing changed


def test_a_bfloat16_vae_streams_the_same_frames_it_returns(tiny_models):
    pipe = load_pipeline(tiny_models["t2v"], kind="t2v", device="cpu", options=InferenceOptions(vae_dtype="bfloat16"))
    chunks = []
    frames = generate_frames(pipe, small_request(num_frames=9), on_frames=chunks.append)
    assert len(chunks) == 3
    np.testing.assert_array_equal(np.concatenate(chunks), frames)


def test_a_tiled_decode_hands_on_every_frame_once_after_decoding(fresh_t2v_pipe):
    fresh_t2v_pipe.vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32,
                                     tile_sample_stride_height=16, tile_sample_stride_width=16)  # fmt: skip
    chunks = []
    frames = generate_frames(fresh_t2v_pipe, small_request(num_frames=9), on_frames=chunks.append)
    assert len(chunks) == 1  # tiles are not frames: nothing is handed on until the video is whole
    np.testing.assert_array_equal(chunks[0], frames)


def test_what_on_frames_raises_stops_the_run_and_leaves_no_hook_and_no_cache(t2v_pipe):
    def refuse(chunk):
        raise StopFromFrames("encoder failed")

    with pytest.raises(StopFromFrames, match="encoder failed"):
        generate_frames(t2v_pipe, small_request(), on_frames=refuse)
    assert not t2v_pipe.vae.decoder._forward_hooks
    # The decode stopped after its first chunk: the VAE's causal feature caches are let go, not kept
    # (on a GPU) until the next decode resets them.
    assert t2v_pipe.vae._feat_map and all(cached is None for cached in t2v_pipe.vae._feat_map)
    assert generate_frames(t2v_pipe, small_request(num_frames=1, infer_steps=1)).shape == (1, 64, 64, 3)


def test_a_video_streamed_while_decoding_is_byte_identical_to_one_encoded_afterwards(t2v_pipe, tmp_path):
    with BackgroundMp4Writer(tmp_path / "streamed.mp4") as writer:
        frames = generate_frames(t2v_pipe, small_request(), on_frames=writer.write)
        writer.close()
    encode_mp4(frames, tmp_path / "afterwards.mp4")
    assert (tmp_path / "streamed.mp4").read_bytes() == (tmp_path / "afterwards.mp4").read_bytes()
    assert probe_mp4(tmp_path / "streamed.mp4")["frames"] == 17


@pytest.mark.parametrize("writer_class", [Mp4Writer, BackgroundMp4Writer])
def test_chunked_writes_give_the_bytes_of_one_write(tmp_path, writer_class):
    frames = sample_frames()
    encode_mp4(frames, tmp_path / "whole.mp4")
    writer = writer_class(tmp_path / "chunked.mp4")
    for start in (0, 1, 5, 9, 13):
        writer.write(frames[start : start + (1 if start == 0 else 4)])
    writer.close()
    assert writer.frames_written == 17
    assert (tmp_path / "chunked.mp4").read_bytes() == (tmp_path / "whole.mp4").read_bytes()


@pytest.mark.parametrize("writer_class", [Mp4Writer, BackgroundMp4Writer])
def test_a_with_block_closes_on_success_and_a_second_close_does_nothing(tmp_path, writer_class):
    frames = sample_frames()
    encode_mp4(frames, tmp_path / "whole.mp4")
    with writer_class(tmp_path / "clip.mp4") as writer:
        writer.write(frames)
    writer.close()
    assert (tmp_path / "clip.mp4").read_bytes() == (tmp_path / "whole.mp4").read_bytes()


def test_a_chunk_of_another_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="32x32 in a 64x48 video"):
        with Mp4Writer(tmp_path / "clip.mp4") as writer:
            writer.write(sample_frames(count=2))
            writer.write(sample_frames(count=2, height=32, width=32))
    assert os.listdir(tmp_path) == []


def test_closing_without_frames_is_refused(tmp_path):
    for writer in (Mp4Writer(tmp_path / "a.mp4"), BackgroundMp4Writer(tmp_path / "b.mp4")):
        with pytest.raises(ValueError, match="no frames"):
            writer.close()
    assert os.listdir(tmp_path) == []


def test_an_encoder_thread_failure_reaches_the_producer_and_leaves_no_file(tmp_path, third_frame_conversion_fails):
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"previous version")
    writer = BackgroundMp4Writer(target)
    writer.write(sample_frames(count=5))
    with pytest.raises(RuntimeError, match="disk on fire"):
        writer.close()
    with pytest.raises(RuntimeError, match="disk on fire"):
        writer.write(sample_frames(count=1))  # and every later write, too
    assert target.read_bytes() == b"previous version"
    assert os.listdir(tmp_path) == ["clip.mp4"]


def test_leaving_the_block_by_an_exception_aborts_and_leaves_nothing(tmp_path):
    with pytest.raises(StopFromFrames):
        with BackgroundMp4Writer(tmp_path / "clip.mp4") as writer:
            writer.write(sample_frames(count=5))
            raise StopFromFrames("cancelled")
    assert os.listdir(tmp_path) == []


def test_an_abort_drops_the_backlog_instead_of_encoding_it(tmp_path):
    writer = BackgroundMp4Writer(tmp_path / "clip.mp4")
    chunk = sample_frames(count=8, height=256, width=256)
    for _ in range(50):
        writer.write(chunk)
    writer.abort()
    assert writer.frames_written < 10 * len(chunk)  # the chunk being encoded (and a few), not all 400 frames
    assert os.listdir(tmp_path) == []

