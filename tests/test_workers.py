"""Integration: --workers N share one port (SO_REUSEPORT) and state through Redis."""
import asyncio
import os
import signal
import subprocess
import time

import pytest

from conftest import Client, Server, ingest, token, update

pytestmark = pytest.mark.integration


def children(pid: int) -> list[int]:
    """Live worker processes of the supervisor (not multiprocessing's resource tracker)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    workers = []
    for x in out.split():
        try:
            cmd = open(f"/proc/{x}/cmdline", "rb").read()
            state = open(f"/proc/{x}/stat").read().split(")")[-1].split()[0]
        except OSError:
            continue
        if b"resource_tracker" not in cmd and state != "Z":
            workers.append(int(x))
    return sorted(workers)


async def test_workers_share_the_port_restart_and_stop(redis_url, uid):
    s = Server("--workers", "2", "--simulate", "0", "--tick-ms", "20", "--redis", redis_url)
    try:
        deadline = time.time() + 20
        while len(children(s.proc.pid)) < 2 and time.time() < deadline:
            time.sleep(0.1)
        workers = children(s.proc.pid)
        assert len(workers) >= 2
        vid = uid + "w"
        ingest(s, [update(vid)])
        await asyncio.sleep(0.5)  # the relay reaches the other worker
        clients, instances = [], set()
        for _ in range(16):
            c = await Client.connect(s, token())
            await c.recv_type("welcome")
            _, msgs = await c.subscribe(subscriptions={"vehicles": [vid]})
            assert [m["v"] for m in msgs] == [vid]
            clients.append(c)
        # batch ids name the instance: both workers serve clients
        ingest(s, [update(vid, 56.0)])
        for c in clients:
            b = await c.recv_type("batch")
            assert b["messages"][0]["p"][0] == 56.0
            instances.add(b["batch_id"].rsplit("-", 1)[0])
        assert len(instances) == 2
        for c in clients:
            await c.close()
        # a worker that dies is restarted
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.time() + 20
        while time.time() < deadline:
            now = children(s.proc.pid)
            if len(now) >= 2 and workers[0] not in now:
                break
            time.sleep(0.1)
        assert len(children(s.proc.pid)) >= 2 and workers[0] not in children(s.proc.pid)
        # SIGTERM to the parent reaches every worker; all exit
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(20) == 0
    finally:
        s.stop()
