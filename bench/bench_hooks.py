"""Inbound hook throughput and p99 latency: edgehook vs adnanh/webhook, same machine, same run.

    .venv/bin/python bench/bench_hooks.py [--duration 5] [--connections 1,16]

edgehook: `edgehook run` as a subprocess (mock pins, default logging at INFO), a
`respond: sync` hook with a bearer token whose rule switches an output (toggle), so
every request goes socket -> auth -> event bus -> dispatcher -> rule -> GPIO -> reply.
webhook: Debian's `webhook` (adnanh/webhook) with a hook that runs /bin/true and waits
for it (`include-command-output-in-response`), i.e. its synchronous mode.

Load comes from `wrk` (Debian `wrk`) in its own process, keep-alive connections,
after a 1 s warm-up. The hook's rate limit is raised for the benchmark (the default,
30 per minute, would answer 429 after the first 30). Target: at c=16
edgehook's req/s >= 1.5 x webhook's, p99 <= 10 ms. Results also go to bench/results/.

BENCH_PY_PREFIX=script.py runs the daemon as `.venv/bin/python script.py run -c ...`
instead of the console script, for what-if experiments (a different logging setup,
sys.setswitchinterval...) measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"

CONFIG = """\
device: {{id: bench}}
state_dir: {state}
gpio:
  backend: mock
  outputs:
    porch_light: {{pin: GPIO27, class: light}}
http:
  listen: 127.0.0.1:{port}
hooks:
  light:
    auth: {{token: {token}}}
    respond: sync
    rate_limit: {{requests: 100000000, per: 1s}}
rules:
  - name: light
    when: {{hook: light}}
    do:
      - output: porch_light
        set: toggle
"""

WRK_LUA = f"""\
wrk.method = "POST"
wrk.body = '{{"state":"toggle"}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {TOKEN}"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)  # noqa: S310
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def parse_wrk(out: str) -> dict[str, float]:
    """Requests/sec and latency percentiles (ms) from `wrk --latency` output."""
    def ms(text: str) -> float:
        m = re.match(r"([\d.]+)(us|ms|s)", text)
        if not m:
            return float("nan")
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
    res = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    for p in ("50", "90", "99"):
        m = re.search(rf"^\s+{p}(?:\.000)?%\s+(\S+)", out, re.M)
        res[f"p{p}_ms"] = ms(m.group(1)) if m else float("nan")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(errors.group(1)) if errors else 0
    sock = re.search(r"Socket errors: (.*)", out)
    res["socket_errors"] = sock.group(1) if sock else ""
    return res


def run_wrk(url: str, lua: Path, connections: int, duration: int) -> dict[str, float]:
    threads = 1 if connections == 1 else 2
    base = ["wrk", f"-t{threads}", f"-c{connections}", "-s", str(lua), "--latency", url]
    subprocess.run([*base[:3], "-d1s", *base[3:]], capture_output=True, check=True)  # warm-up
    out = subprocess.run([*base[:3], f"-d{duration}s", *base[3:]], capture_output=True,
                         text=True, check=True).stdout
    return parse_wrk(out)


def start_edgehook(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cfg = tmp / "edgehook.yaml"
    cfg.write_text(CONFIG.format(state=tmp / "state", port=port, token=TOKEN))
    exe = ROOT / ".venv" / "bin" / "edgehook"
    log = open(tmp / "edgehook.log", "wb")  # noqa: SIM115
    cmd = [str(exe), "run", "-c", str(cfg)]
    if os.environ.get("BENCH_PY_PREFIX"):  # experiments: run through a wrapper script
        cmd = [str(ROOT / ".venv" / "bin" / "python"), os.environ["BENCH_PY_PREFIX"], *cmd[1:]]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=tmp)
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return proc, f"http://127.0.0.1:{port}/hooks/light"


def start_webhook(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    hooks = tmp / "hooks.json"
    hooks.write_text(json.dumps([{"id": "bench", "execute-command": "/bin/true",
                                  "include-command-output-in-response": True,
                                  "http-methods": ["POST"]}]))
    proc = subprocess.Popen(["webhook", "-hooks", str(hooks), "-ip", "127.0.0.1",
                             "-port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/hooks/none")
    return proc, f"http://127.0.0.1:{port}/hooks/bench"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    ap.add_argument("--connections", default="1,16")
    args = ap.parse_args()
    for tool in ("wrk", "webhook"):
        if shutil.which(tool) is None:
            print(f"bench_hooks: `{tool}` not found: apt-get install -y {tool}",
                  file=sys.stderr)
            return 2
    conns = [int(c) for c in args.connections.split(",")]
    results: dict[str, dict[int, dict[str, float]]] = {"edgehook": {}, "webhook": {}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lua = tmp / "post.lua"
        lua.write_text(WRK_LUA)
        for name, start in (("edgehook", start_edgehook), ("webhook", start_webhook)):
            proc, url = start(tmp)
            try:
                for c in conns:
                    results[name][c] = run_wrk(url, lua, c, args.duration)
            finally:
                proc.terminate()
                proc.wait(10)
    cpu = os.cpu_count()
    print(f"hook benchmark: {args.duration} s per point, wrk keep-alive, {cpu} CPUs "
          "(load generator on the same machine)")
    print(f"{'server':10} {'conns':>5} {'req/s':>9} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7}"
          f" {'non-2xx':>7}")
    for name in results:
        for c, r in results[name].items():
            print(f"{name:10} {c:>5} {r['rps']:>9.0f} {r['p50_ms']:>7.2f} {r['p90_ms']:>7.2f} "
                  f"{r['p99_ms']:>7.2f} {r['non_2xx']:>7}")
    ok = True
    for c in conns:
        ratio = results["edgehook"][c]["rps"] / results["webhook"][c]["rps"]
        print(f"c={c}: edgehook/webhook req/s ratio {ratio:.2f}")
    if 16 in conns:
        ratio = results["edgehook"][16]["rps"] / results["webhook"][16]["rps"]
        p99 = results["edgehook"][16]["p99_ms"]
        ok = ratio >= 1.5 and p99 <= 10.0
        print(f"target (c=16: ratio >= 1.5, p99 <= 10 ms): {'met' if ok else 'NOT met'} "
              f"(ratio {ratio:.2f}, p99 {p99:.2f} ms)")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (out_dir / f"hooks-{stamp}.json").write_text(json.dumps(
        {"duration": args.duration, "cpus": cpu, "results": results}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
