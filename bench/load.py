"""A bounded HTTP load run against gunicorn on loopback: latency and throughput per endpoint, nothing lost.

    .venv/bin/python bench/load.py                      # 200 submits + 5000 status polls (+ list, queue/status)
    .venv/bin/python bench/load.py --with-worker --workers 1 --wait   # tasks also run; wait until all finish

What it does: a fresh database ``bench_load`` (dropped and recreated), the tiny model in a temp
folder, ``gunicorn lightx2v_site.wsgi`` (``--web-workers`` sync processes, gthread when
``--threads`` > 1; bench/README.md says why sync), optionally one ``manage.py qcluster`` with
``--workers`` processes. ``--clients`` threads, one user and one ``http.client`` connection each
(kept alive where the server allows), work through a shuffled mix of small submits (64x64, 1 s,
1 step), status polls of their own tasks, list pages and queue/status calls. It prints
p50/p95/p99/max latency and requests/s per endpoint (requests/s = that endpoint's requests /
wall time of the whole mixed phase), then checks: no request errored
or got a non-2xx; every submitted id is visible through its status and counted by its owner's
list; with ``--wait`` every task ends ``succeed`` with ``attempt_count`` 1 and none is left
running. Exit status 1 when a check fails. The load generator shares the 2 CPU cores with the
server, so the numbers are a floor for the server, not a ceiling.
"""
from __future__ import annotations

import argparse
import pathlib
import random
import sys
import threading
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# Run as a script, bench/ is sys.path[0] and bench/queue.py would shadow the stdlib "queue".
if sys.path and pathlib.Path(sys.path[0] or ".").resolve() == REPO_ROOT / "bench":
    sys.path[0] = str(REPO_ROOT)

from bench._harness import FINISHED, Client, CpuMeter, Service, describe_cpu, percentiles  # noqa: E402

SMALL = {"height": 64, "width": 64, "video_duration": 1, "infer_steps": 1}
ENDPOINTS = ("submit", "status", "list", "queue/status")


def share(total: int, index: int, parts: int) -> int:
    """Client ``index``'s part of ``total`` operations split as evenly as possible."""
    return total // parts + (1 if index < total % parts else 0)


def plan(index: int, args) -> list[str]:
    """This client's operations: one submit first (polls need an id), the rest shuffled."""
    counts = {"submit": args.submits, "status": args.polls, "list": args.lists, "queue/status": args.queue_polls}
    ops = [op for op, total in counts.items() for _ in range(share(total, index, args.clients))]
    ops.remove("submit")
    random.Random(index).shuffle(ops)
    return ["submit", *ops]


class LoadClient(threading.Thread):
    """Runs its plan after ``start_line``; keeps (endpoint, http status, seconds, error) per request."""

    def __init__(self, index: int, base_url: str, token: str, ops: list[str], start_line: threading.Barrier):
        super().__init__(name=f"client-{index}", daemon=True)
        self.index, self.client, self.ops, self.start_line = index, Client(base_url, token), ops, start_line
        self.records: list[tuple[str, int, float, str]] = []
        self.task_ids: list[str] = []
        self.rng = random.Random(1000 + index)

    def call(self, op: str) -> tuple[int, float, str]:
        if op == "submit":
            body = {"prompt": f"load client {self.index} task {len(self.task_ids)}", **SMALL}
            status, answer, seconds = self.client.request("POST", "/v1/tasks/video", body)
            if status == 201:
                self.task_ids.append(answer["task_id"])
            return status, seconds, "" if status == 201 else str(answer)[:200]
        path = {
            "status": lambda: f"/v1/tasks/{self.rng.choice(self.task_ids)}/status",
            "list": lambda: "/v1/tasks",
            "queue/status": lambda: "/v1/tasks/queue/status",
        }[op]()
        status, answer, seconds = self.client.request("GET", path)
        return status, seconds, "" if status == 200 else str(answer)[:200]

    def run(self) -> None:
        self.start_line.wait()
        for op in self.ops:
            started = time.perf_counter()
            try:
                status, seconds, error = self.call(op)
            except Exception as exc:  # noqa: BLE001 - every failure is a finding of the run
                status, seconds, error = 0, time.perf_counter() - started, f"{type(exc).__name__}: {exc}"
            self.records.append((op, status, seconds, error))


def run_load(service: Service, tokens: list[str], args) -> tuple[list[LoadClient], float]:
    start_line = threading.Barrier(args.clients + 1)
    clients = [LoadClient(i, service.base_url, tokens[i], plan(i, args), start_line) for i in range(args.clients)]
    for client in clients:
        client.start()
    start_line.wait()
    started = time.perf_counter()
    for client in clients:
        client.join()
    return clients, time.perf_counter() - started


def report(clients: list[LoadClient], wall_s: float) -> list[str]:
    """Print the latency table; return the failures (errors and non-2xx)."""
    records = [record for client in clients for record in client.records]
    print(f"\nmixed phase: {len(records)} requests in {wall_s:.2f} s = {len(records) / wall_s:.0f} req/s overall")
    print(f"{'endpoint':<13}{'n':>6}{'bad':>5}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}{'req/s':>8}")
    for endpoint in ENDPOINTS:
        mine = [r for r in records if r[0] == endpoint]
        bad = sum(1 for r in mine if not 200 <= r[1] < 300)
        stats = percentiles([r[2] * 1000 for r in mine])
        print(f"{endpoint:<13}{len(mine):>6}{bad:>5}{stats['p50']:>9.1f}{stats['p95']:>9.1f}"
              f"{stats['p99']:>9.1f}{stats['max']:>9.1f}{len(mine) / wall_s:>8.0f}")  # fmt: skip
    retries = sum(client.client.retries for client in clients)
    print(f"stale keep-alive connections re-sent: {retries}")
    return [f"{op} -> {status}: {error}" for op, status, _, error in records if not 200 <= status < 300]


def check_visible(clients: list[LoadClient]) -> list[str]:
    """Every submitted id answers 200 to its owner's status, and each owner's list counts them all."""
    failures = []
    for client in clients:
        for task_id in client.task_ids:
            status, body, _ = client.client.request("GET", f"/v1/tasks/{task_id}/status")
            if status != 200 or body.get("task_id") != task_id:
                failures.append(f"task {task_id}: status {status} {str(body)[:200]}")
        status, body, _ = client.client.request("GET", "/v1/tasks")
        if status != 200 or body.get("count") != len(client.task_ids):
            failures.append(f"client {client.index}: list count {body and body.get('count')} != {len(client.task_ids)}")
    return failures


def wait_all_finished(clients: list[LoadClient], timeout: float) -> tuple[list[str], float]:
    """Poll until every task is finished; then each must be succeed with attempt_count 1."""
    pending = {(client, task_id) for client in clients for task_id in client.task_ids}
    finals: dict[str, dict] = {}
    started = time.monotonic()
    while pending and time.monotonic() - started < timeout:
        for client, task_id in list(pending):
            status, body, _ = client.client.request("GET", f"/v1/tasks/{task_id}/status")
            if status == 200 and body["status"] in FINISHED:
                finals[task_id] = body
                pending.discard((client, task_id))
        time.sleep(0.5)
    waited = time.monotonic() - started
    failures = [f"task {task_id} not finished after {timeout:.0f} s" for _, task_id in pending]
    for task_id, body in finals.items():
        if body["status"] != "succeed" or body["attempt_count"] != 1:
            failures.append(
                f"task {task_id}: {body['status']} after {body['attempt_count']} attempts: {body['message']}"
            )
    _, queue, _ = clients[0].client.request("GET", "/v1/tasks/queue/status")
    if queue["counts"]["running"] or queue["counts"]["submitted"]:
        failures.append(f"left unfinished: {queue['counts']}")
    return failures, waited


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--submits", type=int, default=200)
    parser.add_argument("--polls", type=int, default=5000, help="status polls")
    parser.add_argument("--lists", type=int, default=200, help="GET /v1/tasks")
    parser.add_argument("--queue-polls", type=int, default=200, help="GET /v1/tasks/queue/status")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients, one user each")
    parser.add_argument("--with-worker", action="store_true", help="run a qcluster while the load runs")
    parser.add_argument("--workers", type=int, default=1, help="worker processes of that qcluster")
    parser.add_argument("--wait", action="store_true", help="with a worker: wait for every task to finish")
    parser.add_argument("--wait-timeout", type=float, default=180)
    parser.add_argument("--web-workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=1, help="gunicorn threads per worker (1 = sync worker)")
    args = parser.parse_args(argv)
    if args.submits < args.clients:
        parser.error("--submits must be at least --clients (each client polls its own tasks)")
    if args.wait and not args.with_worker:
        parser.error("--wait needs --with-worker")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with Service("load") as service:
        set_up = time.perf_counter()
        service.prepare()
        tokens = list(service.tokens([f"load{i}" for i in range(args.clients)]).values())
        service.start_web(workers=args.web_workers, threads=args.threads)
        if args.with_worker:
            service.start_workers(args.workers)
        kind = f"gthread x{args.threads}" if args.threads > 1 else "sync"
        worker = f"{args.workers} worker process(es)" if args.with_worker else "no worker"
        print(f"set-up {time.perf_counter() - set_up:.1f} s; gunicorn -w {args.web_workers} ({kind}); {worker};"
              f" {args.clients} clients")  # fmt: skip
        meter = CpuMeter(service)
        before = meter.snapshot()
        clients, wall_s = run_load(service, tokens, args)
        used = meter.since(before)
        failures = report(clients, wall_s)
        requests = sum(len(client.records) for client in clients)
        print(describe_cpu(used))
        print(f"web CPU per request (gunicorn + postgres, which also serves the worker): "
              f"{(used['gunicorn'] + used['postgres']) / requests * 1000:.2f} ms")  # fmt: skip
        failures += check_visible(clients)
        submitted = sum(len(client.task_ids) for client in clients)
        print(f"visible: {submitted} submitted ids checked through status and list")
        if args.wait:
            finish_failures, waited = wait_all_finished(clients, args.wait_timeout)
            failures += finish_failures
            print(f"drained: all {submitted} tasks finished {waited:.1f} s after the load phase")
        if failures:
            print(f"\nFAIL: {len(failures)} problem(s); first ones:")
            for failure in failures[:20]:
                print("  " + failure)
            for name in ("gunicorn", "qcluster"):
                print(f"--- {name} log tail\n{service.log(name)[-3000:]}")
            return 1
        print("\nOK: no errors, no non-2xx, nothing lost")
        return 0


if __name__ == "__main__":
    sys.exit(main())
