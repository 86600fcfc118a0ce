"""One machine's Dynamo deployment on loopback: a frontend and N fusionserve workers (``make dynamo-up``).

No etcd and no NATS: file discovery (``DYN_DISCOVERY_BACKEND=file``, ``DYN_FILE_KV``), the TCP request plane
and the ZMQ event plane, every host variable on 127.0.0.1, a system port (health, metrics) per worker below
32768 (Dynamo 1.6.1 reads it as a signed 16-bit integer), and ``HOME`` in the work folder (its model-card
cache). ``--disagg``: one prefill worker and N decode workers in one KV transfer group.

    python -m serve.dynamo.launch --model DIR --workers 2 --http-port 8000 [--router-mode kv] [--disagg]
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LOOPBACK = "127.0.0.1"


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A free TCP port on loopback below 32768."""
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high}]")


def loopback_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ, HOME=str(workdir / "home"), DYN_DISCOVERY_BACKEND="file",
               DYN_FILE_KV=str(workdir / "discovery"), DYN_REQUEST_PLANE="tcp", DYN_EVENT_PLANE="zmq")
    for name in ("DYN_TCP_RPC_HOST", "DYN_TCP_RESPONSE_STREAM_HOST", "DYN_EVENT_PLANE_HOST", "DYN_SYSTEM_HOST"):
        env[name] = LOOPBACK
    return env


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path
    system_port: int | None = None  # workers: health and /metrics

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Cluster:
    """``start()`` returns once the frontend lists the model and every worker answers its health check."""

    model: str
    num_workers: int = 2
    router_mode: str = "kv"
    disagg: bool = False  # one prefill worker + num_workers decode workers
    served_model_name: str = "fusionserve"
    worker_args: tuple[str, ...] = ()
    frontend_args: tuple[str, ...] = ()
    http_port: int = 0
    workdir: Path | None = None
    processes: list[Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def workers(self) -> list[Process]:
        return [p for p in self.processes if p.system_port is not None]

    def start(self, timeout_s: float = 180.0) -> Cluster:
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="fusionserve-dynamo-"))
        self.http_port = self.http_port or free_port()
        env = loopback_env(self.workdir)
        python = sys.executable
        worker = [python, "-m", "serve", "dynamo-worker", "--model", str(self.model), "--discovery-backend", "file",
                  "--event-plane", "zmq", "--served-model-name", self.served_model_name, *self.worker_args]
        roles = [("decode" if self.disagg else "aggregated", f"worker{i}") for i in range(self.num_workers)]
        if self.disagg:
            roles.insert(0, ("prefill", "prefill"))
            master = f"{LOOPBACK}:{free_port()}"
        try:
            for rank, (mode, name) in enumerate(roles):
                port = free_port()
                extra = ["--mode", mode]
                if self.disagg:
                    extra += ["--kv-transfer-master", master, "--kv-transfer-rank", str(rank),
                              "--kv-transfer-world-size", str(len(roles))]
                self._spawn(name, worker + extra, dict(env, DYN_SYSTEM_PORT=str(port)), port)
            self._spawn("frontend", [python, "-m", "dynamo.frontend", "--http-host", LOOPBACK, "--http-port",
                                     str(self.http_port), "--router-mode", self.router_mode, *self.frontend_args], env)
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str], env: dict, system_port: int | None = None) -> None:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(Process(name, popen, log_path, system_port))

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = set(range(len(self.processes)))
        while pending:
            for i in sorted(pending):
                proc = self.processes[i]
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()[-3000:]}")
                if self._ready(proc):
                    pending.discard(i)
            if time.monotonic() > deadline:
                names = ", ".join(self.processes[i].name for i in sorted(pending))
                raise TimeoutError(f"not ready after {timeout_s:g} s: {names}")
            time.sleep(0.25)

    def _ready(self, proc: Process) -> bool:
        """A worker: its health check says ready; the frontend: it lists the model and sees every worker."""
        try:
            if proc.system_port is not None:
                health = httpx.get(f"http://{LOOPBACK}:{proc.system_port}/health", timeout=2.0)
                return health.status_code == 200 and health.json().get("status") == "ready"
            models = httpx.get(f"{self.url}/v1/models", timeout=2.0)
            health = httpx.get(f"{self.url}/health", timeout=2.0)
        except (httpx.HTTPError, ValueError):
            return False
        instances = [i for i in health.json().get("instances", []) if i.get("endpoint") == "generate"]
        return self.served_model_name in models.text and len(instances) == len(self.workers)

    def metric(self, worker: Process, name: str) -> float:
        """A worker's metric from its system port's /metrics (the sum over its label sets)."""
        text = httpx.get(f"http://{LOOPBACK}:{worker.system_port}/metrics", timeout=5.0).text
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(name + "{") or line.startswith(name + " ")]
        if not values:
            raise KeyError(f"{worker.name} has no metric {name}")
        return sum(values)

    def kill(self, proc: Process) -> None:
        """SIGKILL, as a crash."""
        if proc.popen.poll() is None:
            os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(10)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            if proc.popen.poll() is None:
                os.killpg(proc.popen.pid, signal.SIGTERM)
        for proc in reversed(self.processes):
            try:
                proc.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.kill(proc)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.dynamo.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face-format folder with a chat_template")
    p.add_argument("--workers", type=int, default=2, help="aggregated workers (decode workers with --disagg)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--router-mode", default="kv", help="kv | round-robin | random ... (the frontend's)")
    p.add_argument("--served-model-name", default="fusionserve")
    p.add_argument("--disagg", action="store_true", help="one prefill worker + --workers decode workers")
    p.add_argument("--workdir", default=None, help="logs, discovery files and HOME (default: a new temp folder)")
    p.add_argument("--migration-limit", type=int, default=3, help="retries of a request whose worker died")
    args, worker_args = p.parse_known_args(argv)
    cluster = Cluster(args.model, args.workers, args.router_mode, args.disagg, args.served_model_name,
                      tuple(worker_args), ("--migration-limit", str(args.migration_limit)), args.http_port,
                      Path(args.workdir) if args.workdir else None)
    with cluster:
        print(f"fusionserve on Dynamo: OpenAI API on {cluster.url}/v1 ({len(cluster.workers)} workers, router "
              f"{args.router_mode}; logs in {cluster.workdir}); Ctrl-C stops", flush=True)
        try:
            while all(proc.popen.poll() is None for proc in cluster.processes):
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
