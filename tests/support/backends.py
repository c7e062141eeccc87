"""Private Redis and PostgreSQL servers for tests that stop, kill or cut off a backend.

They run on free ports under a temporary folder and never touch the shared instances
on 6379 and 5432. Each can be stopped and started again on the same port (data kept
on disk when `durable`), which is what outage and recovery tests need.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# Re-exported: tests and benchmarks import it from here.
from services.kit.net import free_port as free_port


def _wait_port(port: int, timeout: float, *, up: bool) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            reachable = sock.connect_ex(("127.0.0.1", port)) == 0
        if reachable == up:
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not become {'reachable' if up else 'free'} in {timeout}s")


class PrivateRedis:
    """A redis-server of our own: `start()`, `stop()` (SIGKILL with kill=True), `url`."""

    def __init__(self, *, durable: bool = False) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ballast-redis-"))
        self.durable = durable
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--save", ""]
        self._proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                *persistence,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, 10, up=True)

    def stop(self, *, kill: bool = False) -> None:
        if self._proc is None:
            return
        if kill:
            self._proc.kill()
        else:
            self._proc.terminate()
        self._proc.wait(timeout=10)
        self._proc = None
        _wait_port(self.port, 10, up=False)

    def close(self) -> None:
        self.stop(kill=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not candidates:
        raise RuntimeError(f"{name} is not installed")
    return str(candidates[-1])


class PrivatePostgres:
    """A PostgreSQL cluster of our own (initdb into a temp folder), trust auth, database `test`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ballast-pg-"))
        self.data = self.dir / "data"
        # initdb refuses to run as root; use the postgres account when we are root.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(
            [*self._as, _pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self._running = False

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=on"
        subprocess.run(
            [
                *self._as,
                _pg_bin("pg_ctl"),
                "-D",
                str(self.data),
                "-o",
                options,
                "-w",
                "-l",
                str(self.dir / "log"),
                "start",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self._running = True

    def stop(self, *, mode: str = "fast") -> None:
        """mode: smart, fast or immediate (immediate is a crash: no checkpoint)."""
        if not self._running:
            return
        subprocess.run(
            [*self._as, _pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self._running = False

    def close(self) -> None:
        # Stop by the data directory whatever `_running` says: a start that timed out may
        # still have left a server behind.
        with contextlib.suppress(Exception):
            subprocess.run(
                [*self._as, _pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=30,
            )
        self._running = False
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def private_redis(*, durable: bool = False) -> Iterator[PrivateRedis]:
    server = PrivateRedis(durable=durable)
    server.start()
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    try:
        yield server
    finally:
        server.close()


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port + 10000)) != 0:
                return port


class PrivateRedisCluster:
    """A Redis Cluster of our own: `masters` primaries, each with `replicas` replicas, on free
    ports (`redis-server --cluster-enabled yes`, joined by `redis-cli --cluster create`)."""

    def __init__(self, *, masters: int = 3, replicas: int = 1) -> None:
        for tool in ("redis-server", "redis-cli"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed")
        self.replicas = replicas
        self.ports = [_cluster_port() for _ in range(masters * (1 + replicas))]
        self.dir = Path(tempfile.mkdtemp(prefix="ballast-redis-cluster-"))
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The limiter's store URL: one node to start from, the client finds the others."""
        return f"redis://127.0.0.1:{self.ports[0]}/0?cluster=true"

    def cli(self, port: int, *args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(port), *args], check=True, capture_output=True, text=True, timeout=30
        ).stdout

    def start(self) -> None:
        for port in self.ports:
            folder = self.dir / str(port)
            folder.mkdir()
            self._procs[port] = subprocess.Popen(
                [
                    "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        for port in self.ports:
            _wait_port(port, 10, up=True)
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        self.wait_ok()

    def wait_ok(self, timeout: float = 60) -> None:
        """Until every node says the cluster is ok and every replica is in sync."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in self.cli(p, "cluster", "info") for p in self._procs) and all(
                "master_link_status:down" not in self.cli(p, "info", "replication") for p in self._procs
            ):
                return
            time.sleep(0.1)
        raise TimeoutError("the Redis Cluster did not become ok")

    def nodes(self) -> list[dict[str, str]]:
        """CLUSTER NODES as seen from a live node: id, port, role (master/slave), master id, slots."""
        port = next(iter(self._procs))
        out = []
        for line in self.cli(port, "cluster", "nodes").splitlines():
            fields = line.split()
            out.append(
                {
                    "id": fields[0],
                    "port": fields[1].split("@")[0].rsplit(":", 1)[1],
                    "role": "master" if "master" in fields[2] else "slave",
                    "master": fields[3],
                    "slots": " ".join(fields[8:]),
                }
            )
        return out

    def master_of(self, key: str) -> int:
        """The port of the primary that owns `key`'s slot."""
        slot = int(self.cli(self.ports[0], "cluster", "keyslot", key).strip())
        for node in self.nodes():
            if node["role"] != "master":
                continue
            for part in node["slots"].split():
                low, _, high = part.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return int(node["port"])
        raise LookupError(f"no primary serves slot {slot}")

    def fail_over(self, master_port: int) -> int:
        """Promotes a replica of `master_port` (CLUSTER FAILOVER on it); the new primary's port."""
        master_id = next(n["id"] for n in self.nodes() if n["port"] == str(master_port))
        replica = int(next(n["port"] for n in self.nodes() if n["master"] == master_id))
        self.cli(replica, "cluster", "failover")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "role:master" in self.cli(replica, "info", "replication"):
                self.wait_ok()
                return replica
            time.sleep(0.1)
        raise TimeoutError(f"replica {replica} was not promoted")

    def primaries(self) -> list[int]:
        return [int(n["port"]) for n in self.nodes() if n["role"] == "master"]

    def delete_matching(self, pattern: str) -> None:
        """Deletes the keys matching `pattern` on every primary."""
        import redis

        for port in self.primaries():
            client = redis.Redis(port=port)
            try:
                for key in list(client.scan_iter(match=pattern, count=1000)):
                    client.delete(key)
            finally:
                client.close()

    def close(self) -> None:
        for proc in self._procs.values():
            proc.kill()
        for proc in self._procs.values():
            proc.wait(timeout=10)
        self._procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def private_redis_cluster(*, masters: int = 3, replicas: int = 1) -> Iterator[PrivateRedisCluster]:
    cluster = PrivateRedisCluster(masters=masters, replicas=replicas)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
