"""A private Prometheus (Debian's `prometheus` binary) for tests: loopback only, a free port,
its own temporary data directory, short scrape and rule intervals; stopped by its own pid."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from services.kit.net import free_port


class PrivatePrometheus:
    def __init__(
        self,
        targets: Mapping[str, Sequence[str]],
        rule_files: Sequence[Path] = (),
        *,
        interval: str = "1s",
    ) -> None:
        """`targets`: job name → host:port list. Rule groups are rewritten to run every `interval`."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus is not installed (scripts/ensure_prometheus.sh installs it)")
        self._binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="ballast-prometheus-"))
        self.port = free_port()
        rules = []
        for index, path in enumerate(rule_files):
            data: dict[str, Any] = yaml.safe_load(path.read_text())
            for group in data["groups"]:
                group["interval"] = interval
            copy = self.dir / f"rules-{index}-{path.name}"
            copy.write_text(yaml.safe_dump(data, sort_keys=False))
            rules.append(str(copy))
        config = {
            "global": {
                "scrape_interval": interval,
                "evaluation_interval": interval,
                "scrape_timeout": interval,
            },
            "rule_files": rules,
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": list(hosts)}]}
                for job, hosts in targets.items()
            ],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, within: float = 120.0) -> None:
        self._log = (self.dir / "prometheus.log").open("wb")
        self._proc = subprocess.Popen(
            [
                self._binary,
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus was not ready in {within}s: {self.log()[-2000:]}")

    def log(self) -> str:
        path = self.dir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(30)
        self._proc = None
        if hasattr(self, "_log"):
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
