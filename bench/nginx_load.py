"""The nginx the probe benches load: one worker serving a 1 KiB static file on loopback from a private config and
port, driven by wrk, each pinned to its own CPU. Shared by bench_probes.py (the whole agent) and bench_http.py (the
http part alone), so both measure the same server."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

NGINX_CONF = """
worker_processes 1;
daemon off;
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    server {{ listen 127.0.0.1:{port}; root {tmp}/www; }}
}}
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_cpu_seconds(master: int) -> float:
    """User + system CPU time of nginx's worker processes (the master's children), from /proc/PID/stat. The BPF
    programs run inside the worker's system calls and context switches, so what they cost it is counted here, on
    the process that pays it, beside the requests/s of the whole machine."""
    total = 0
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{master}/task").iterdir():
        for child in (task / "children").read_text().split():
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / tick


def pinned(cpu: int) -> list[str]:
    """taskset prefix: nginx on the first CPU, wrk on the last, so that where the scheduler puts them does not vary
    from run to run (with one CPU, nothing to pin)."""
    cpus = sorted(os.sched_getaffinity(0))
    return ["taskset", "-c", str(cpus[cpu])] if len(cpus) > 1 else []


def wrk_requests_per_second(port: int, seconds: int) -> float:
    out = subprocess.run([*pinned(-1), "wrk", "-t1", "-c32", f"-d{seconds}s", f"http://127.0.0.1:{port}/index.html"],
                         capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    match = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if not match or re.search(r"Non-2xx", out):
        raise RuntimeError(f"wrk: unexpected output: {out[-300:]}")
    return float(match[1])


@contextmanager
def running_nginx(cpu: int | None = 0) -> Iterator[tuple[subprocess.Popen, int]]:
    """nginx serving a 1 KiB index.html from a private directory and port (pinned to ``cpu`` unless None), answering
    before this yields (process, port); stopped with SIGTERM afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
        port = free_port()
        (Path(tmp) / "www").mkdir()
        (Path(tmp) / "www" / "index.html").write_text("x" * 1024)  # 1 KiB static file
        (Path(tmp) / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=port))
        nginx = subprocess.Popen([*(pinned(cpu) if cpu is not None else []), "nginx", "-p", tmp, "-c",
                                  f"{tmp}/nginx.conf"], stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 10
            while subprocess.run(["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{port}/index.html"]).returncode:
                if nginx.poll() is not None or time.monotonic() > deadline:
                    said = nginx.stderr.read() if nginx.poll() is not None else "no answer in 10 s"
                    raise RuntimeError(f"nginx did not start: {said}")
                time.sleep(0.2)
            yield nginx, port
        finally:
            from bench_probes import stop  # here: bench_probes imports this module

            stop(nginx)
