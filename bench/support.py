"""What several benchmarks do the same way: start and stop the suite's processes, wait until a
service is SERVING, the command line of a zero-latency SIMULATED provider, and writing a
result's table and data under bench/results."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def save_results(name: str, text: str, data: Any) -> None:
    """bench/results/<name>.md (the printed report) and <name>.json (what it was made from)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")


# The instructions that decide which int8 kernels onnxruntime can use (the local embedder's speed
# with int8 weights against float ones depends on them).
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512vnni", "avx_vnni", "amx_int8")


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU's model name and which of INT8_FLAGS it has, from /proc/cpuinfo ("" elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ""
    model, flags = "", set[str]()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name == "model name" and not model:
            model = value.strip()
        elif name == "flags" and not flags:
            flags = set(value.split())
    found = [flag for flag in INT8_FLAGS if flag in flags]
    return f"{model or 'unknown CPU'} ({', '.join(found) or 'none of ' + ', '.join(INT8_FLAGS)})"


def collector_variables(port: int, ratio: str | None = None) -> dict[str, str]:
    """The OTEL_* variables that send a process's spans to a benchmark's local OTLP collector on
    `port`, a batch every 0.5 s (the SDK's default is 5 s) so that a batch's spans arrive soon
    after it; with `ratio`, parent-based sampling keeping that share of traces ("0.1")."""
    variables = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "500",
    }
    if ratio is not None:
        variables["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        variables["OTEL_TRACES_SAMPLER_ARG"] = ratio
    return variables


def instant_sim(port: int, name: str = "sim-bench") -> list[str]:
    """`python -m services.router.sim` answering at once: what is measured is Ballast, not it."""
    return [
        sys.executable, "-m", "services.router.sim", "--port", str(port), "--name", name,
        "--latency-ms", "0", "--p99-ms", "0", "--distribution", "fixed", "--tokens-per-second", "0",
    ]  # fmt: skip


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A process of the benchmark, run from the repository root, its output appended to `log`."""
    handle = log.open("ab")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=handle, stderr=handle)


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each (they drain), then SIGKILL to any still running after 30 s."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


async def healthy(address: str, within: float = 180.0) -> None:
    """Waits until the gRPC health service at `address` answers SERVING."""
    deadline = time.monotonic() + within
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{address} did not become healthy")
            await asyncio.sleep(0.25)


# Where a baseline checkout keeps the packages it needs and this environment lacks.
BASELINE_DEPS = ".bench-deps"


def unmet_requirements(pyproject: str) -> list[str]:
    """The [project] dependencies of a pyproject.toml's text that this Python environment does
    not satisfy: not installed, or installed at a version the requirement excludes (requirements
    whose environment marker does not apply here are skipped)."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement

    unmet = []
    for text in tomllib.loads(pyproject).get("project", {}).get("dependencies", []):
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            unmet.append(text)
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            unmet.append(text)
    return unmet


def install_baseline_requirements(tree: Path) -> list[str]:
    """Installs what an older checkout needs and this environment lacks (a package since dropped,
    such as opentelemetry-instrumentation-grpc before issue 23) into tree/.bench-deps, for that
    tree's processes alone (see suite_pythonpath): the packages this environment already has are
    pinned at their installed versions, so both trees run on the same libraries wherever they
    can. Says what was installed."""
    unmet = unmet_requirements((tree / "pyproject.toml").read_text())
    if not unmet:
        return []
    from importlib import metadata

    pins = sorted({f"{dist.metadata['Name']}=={dist.version}" for dist in metadata.distributions()})
    constraints = tree / f"{BASELINE_DEPS}-constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    print(f"    baseline: installing {', '.join(unmet)} for it alone", file=sys.stderr, flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--target", str(tree / BASELINE_DEPS), "--constraint", str(constraints), *unmet],
        check=True,
    )  # fmt: skip
    for package in (tree / BASELINE_DEPS).iterdir():
        if package.is_dir() and package.name.isidentifier() and not (package / "__init__.py").exists():
            # A namespace package's part here would be hidden by a regular package of the same
            # name in this environment (an empty opentelemetry/__init__.py, shipped by
            # xds-protos): made regular and extended over every part, it finds both.
            (package / "__init__.py").write_text(
                "from pkgutil import extend_path\n\n__path__ = extend_path(__path__, __name__)\n"
            )
    return unmet


def baseline_tree(rev: str, folder: Path) -> Path:
    """REV checked out into a git worktree under `folder` (removed with remove_baseline_tree),
    with what it needs and this environment lacks (install_baseline_requirements)."""
    tree = folder / "baseline"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    install_baseline_requirements(tree)
    return tree


def remove_baseline_tree(folder: Path) -> None:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder / "baseline")], check=False
    )


def suite_pythonpath(tree: Path) -> list[str]:
    """PYTHONPATH entries for a checkout's processes: its own packages installed by
    install_baseline_requirements first, then the tree and its generated code."""
    deps = tree / BASELINE_DEPS
    return [*([str(deps)] if deps.is_dir() else []), str(tree), str(tree / "gen")]
