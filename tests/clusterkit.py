"""A real local Redis Cluster for the tests: three primaries, no replicas.

Each primary is an ``EmbeddedRedis`` (the engine's safe AOF settings, its own
directory, a loopback port and a unix socket) started with
``cluster-enabled yes``; ``redis-cli --cluster create`` joins them. Only the
processes started here are ever signalled, by their pid.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from engine.store.embedded import EmbeddedRedis, EmbeddedRedisError

# Short enough that a primary killed for longer is marked failed quickly, long
# enough that a loaded 2-core machine does not see false failures.
NODE_TIMEOUT_MS = 3000


def free_port() -> int:
    """A free loopback port whose cluster-bus port (+10000) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass
class LocalCluster:
    root: Path
    size: int = 3
    nodes: list[EmbeddedRedis] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A seed node in the engine's cluster URL scheme."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    @property
    def seed_url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def extra(self) -> dict[str, str]:
        return {"cluster-enabled": "yes", "cluster-config-file": "nodes.conf",
                "cluster-node-timeout": str(NODE_TIMEOUT_MS),
                # Tests run on one host; announce the loopback address.
                "cluster-announce-ip": "127.0.0.1"}

    def start(self) -> None:
        for exe in ("redis-server", "redis-cli"):
            if shutil.which(exe) is None:
                raise RuntimeError(f"{exe} is not installed (apt-get install redis-server"
                                   " redis-tools)")
        for i in range(self.size):
            for attempt in range(3):
                # Another job may take the port between our probe and the start.
                node = EmbeddedRedis(self.root / f"node{i}-{attempt}", port=free_port())
                try:
                    node.start(self.extra())
                    break
                except EmbeddedRedisError:
                    if attempt == 2:
                        raise
            self.nodes.append(node)
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=60)
        self.wait_ok()

    def client(self, node: EmbeddedRedis) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=node.port, decode_responses=True,
                           socket_timeout=5)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node says cluster_state:ok and agrees on who serves every slot."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                views = []
                for n in self.nodes:
                    with self.client(n) as c:
                        info = c.execute_command("CLUSTER", "INFO")
                        state = info.get("cluster_state") if isinstance(info, dict) else (
                            "ok" if "cluster_state:ok" in str(info) else "fail")
                        if state != "ok":
                            raise RuntimeError(f"node {n.port}: cluster_state {state}")
                        views.append(sorted(
                            (int(s[0]), int(s[1]), int(s[2][1]))
                            for s in c.execute_command("CLUSTER", "SLOTS")))
                if all(v == views[0] for v in views) and sum(
                        e - s + 1 for s, e, _ in views[0]) == 16384:
                    return
                last = "nodes disagree on the slot map"
            except (redis.RedisError, OSError, RuntimeError) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(f"cluster not ok after {timeout} s: {last}")

    def owner_of(self, key: str) -> EmbeddedRedis:
        return self.owner_of_slot(redis.crc.key_slot(key.encode()))

    def owner_of_slot(self, slot: int) -> EmbeddedRedis:
        with self.client(self.nodes[0]) as c:
            for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"slot {slot} not served")

    def node_id(self, node: EmbeddedRedis) -> str:
        with self.client(node) as c:
            return str(c.execute_command("CLUSTER", "MYID"))

    def flush(self) -> None:
        for n in self.nodes:
            with self.client(n) as c:
                c.flushall()

    def kill(self, node: EmbeddedRedis) -> None:
        """SIGKILL one primary, as a crash would (its AOF and nodes.conf stay)."""
        node.kill()

    def restart(self, node: EmbeddedRedis) -> None:
        """Start it again on the same port and directory: it reloads its AOF and
        rejoins with the node id in its nodes.conf."""
        node.start(self.extra())
        self.wait_ok()

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
