"""``python -m lightx2v_client``: generate a video, or look at, cancel and download a task.

Exit codes: 0 done; 2 bad input or a 4xx answer; 3 the task failed or was cancelled; 4 the server is
unreachable, answered 5xx, or still answered 429 (too many unfinished tasks) after the retries;
130 interrupted (Ctrl-C cancels the task on the server first).
"""
import argparse
import json
import os
import sys
import uuid
from pathlib import Path

from .api import ApiError, Client, ServerUnreachable, reason
from .progress import ProgressBar

EXIT_OK, EXIT_BAD_INPUT, EXIT_TASK_FAILED, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 2, 3, 4, 130
DEFAULT_SERVER = "http://127.0.0.1:8000"
# CLI option -> request field (only options given are sent; the server fills in its defaults).
REQUEST_FIELDS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "steps": "infer_steps",
    "duration": "video_duration",
    "height": "height",
    "width": "width",
    "seed": "seed",
    "fragments": "num_fragments",
    "guidance": "guidance_scale",
    "lora": "lora_name",
    "lora_strength": "lora_strength",
}


def build_parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--server", default=argparse.SUPPRESS, help="API base URL (env LIGHTX2V_SERVER)")
    connection.add_argument("--token", default=argparse.SUPPRESS, help="API token (env LIGHTX2V_TOKEN)")
    connection.add_argument(
        "--retries", type=int, default=argparse.SUPPRESS,
        help="retries of a call without answer or with 429 or 502-504 (3)",
    )
    parser = argparse.ArgumentParser(
        prog="python -m lightx2v_client",
        description=__doc__,
        parents=[connection],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", parents=[connection], help="submit, wait, download")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--image", type=Path, help="input image (PNG, JPEG, WebP) for image-to-video")
    generate.add_argument("--negative-prompt")
    generate.add_argument("--steps", type=int, help="denoising steps (server default 4)")
    generate.add_argument("--duration", type=int, help="seconds (server default 5)")
    generate.add_argument("--height", type=int)
    generate.add_argument("--width", type=int)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--fragments", type=int, help="long video: number of fragments")
    generate.add_argument("--guidance", type=float, help="guidance scale (> 1 runs CFG)")
    generate.add_argument("--lora", help="a LoRA name from /v1/service/metadata")
    generate.add_argument("--lora-strength", type=float)
    generate.add_argument("--out", type=Path, required=True, help="where to write the MP4")
    generate.add_argument("--poll-interval", type=float, default=0.5, help="seconds between status polls")

    status = commands.add_parser("status", parents=[connection], help="print a task's status as JSON")
    status.add_argument("task_id")
    cancel = commands.add_parser("cancel", parents=[connection], help="cancel a submitted or running task")
    cancel.add_argument("task_id")
    download = commands.add_parser("download", parents=[connection], help="download a finished task's MP4")
    download.add_argument("task_id")
    download.add_argument("--out", type=Path, required=True)
    return parser


def request_params(args: argparse.Namespace) -> dict:
    given = {field: getattr(args, option) for option, field in REQUEST_FIELDS.items()}
    return {field: value for field, value in given.items() if value is not None}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cmd_generate(args: argparse.Namespace, client: Client) -> int:
    if args.image is not None and not args.image.is_file():
        say(f"error: --image: no such file: {args.image}")
        return EXIT_BAD_INPUT
    try:
        created = client.submit(request_params(args), image=args.image, idempotency_key=str(uuid.uuid4()))
    except KeyboardInterrupt:
        say("interrupted while submitting; the task may exist (see GET /v1/tasks)")
        return EXIT_INTERRUPTED
    task_id = created["task_id"]
    say(f"task {task_id} submitted")
    bar, final = ProgressBar(), None
    try:
        final = client.wait(task_id, interval=args.poll_interval, on_update=bar.update)
        bar.close()
        if final["status"] != "succeed":
            say(f"error: task {task_id} {final['status']}: {reason(final)}")
            return EXIT_TASK_FAILED
        size = client.download(task_id, args.out)
    except KeyboardInterrupt:
        bar.close()
        return EXIT_INTERRUPTED if final is not None else cancel_after_interrupt(client, task_id)
    say(f"saved {args.out} ({size} bytes)")
    print(args.out)
    return EXIT_OK


def cancel_after_interrupt(client: Client, task_id: str) -> int:
    """Ctrl-C while waiting: cancel the task on the server so it does not keep a worker busy."""
    say(f"interrupted: cancelling task {task_id}")
    try:
        body = client.cancel(task_id)
        say(f"task {task_id} {body.get('status', 'cancelled')}")
    except ApiError as exc:
        say(f"could not cancel task {task_id}: {exc.message}")
    except (ServerUnreachable, KeyboardInterrupt) as exc:
        say(f"could not cancel task {task_id}: {exc or 'interrupted again'}")
    return EXIT_INTERRUPTED


def cmd_status(args: argparse.Namespace, client: Client) -> int:
    print(json.dumps(client.status(args.task_id), indent=2))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace, client: Client) -> int:
    body = client.cancel(args.task_id)
    say(f"task {args.task_id} {body['status']}")
    print(json.dumps(body, indent=2))
    return EXIT_OK


def cmd_download(args: argparse.Namespace, client: Client) -> int:
    try:
        size = client.download(args.task_id, args.out)
    except ApiError as exc:
        if exc.status_code == 409 and isinstance(exc.body, dict) and exc.body.get("status") in ("failed", "cancelled"):
            say(f"error: {exc.message}")
            return EXIT_TASK_FAILED
        raise
    say(f"saved {args.out} ({size} bytes)")
    print(args.out)
    return EXIT_OK


COMMANDS = {"generate": cmd_generate, "status": cmd_status, "cancel": cmd_cancel, "download": cmd_download}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    server = getattr(args, "server", None) or os.environ.get("LIGHTX2V_SERVER") or DEFAULT_SERVER
    token = getattr(args, "token", None) or os.environ.get("LIGHTX2V_TOKEN", "")
    if not token:
        say("error: no API token: pass --token or set LIGHTX2V_TOKEN")
        return EXIT_BAD_INPUT
    client = Client(server, token, retries=max(getattr(args, "retries", 3), 0),
                    on_retry=lambda why, wait_s: say(f"{why}; trying again in {wait_s:g} s"))
    try:
        return COMMANDS[args.command](args, client)
    except ApiError as exc:
        say(f"error: {exc.message} (HTTP {exc.status_code})")
        return EXIT_UNREACHABLE if exc.status_code >= 500 or exc.status_code == 429 else EXIT_BAD_INPUT
    except ServerUnreachable as exc:
        say(f"error: cannot reach the server: {exc}")
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        say("interrupted")
        return EXIT_INTERRUPTED
    except (OSError, ValueError) as exc:  # --out in a folder that cannot be written, a malformed --server
        say(f"error: {exc}")
        return EXIT_BAD_INPUT
