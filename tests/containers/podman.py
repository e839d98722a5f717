"""Rootful podman for the container tests: own storage, a local base image, offline builds.

No registry is reachable here, so the base image the Dockerfile names in `FROM` is made with
debootstrap and tagged exactly as that name; builds run with `--network none` and install
wheels that the host downloaded (pinned by constraints.txt) from a mounted wheelhouse.
Everything slow (rootfs tarball, wheelhouse, image storage) is kept under `.cache/containers/`
so a second run on the same machine reuses it; a fresh clone builds it all from nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "containers"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# Root here may not raise RLIMIT_NOFILE, and crun fails on this cgroup layout.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
"""
#: What the slim python image gives that a Debian minbase lacks (python, venv, CA roots).
BASE_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates,passwd"
#: The project's own image name, as docker/compose*.yaml call it.
SERVER_IMAGE = "localhost/adaface-serving:0.1.0"


class PodmanError(RuntimeError):
    """A podman command failed; the message holds its command line and output tail."""


def debian_mirror(suite: str = "bookworm") -> str:
    """The mirror apt already uses on this machine for Debian `suite` (the one reachable)."""
    listed = sorted(Path("/etc/apt/sources.list.d").glob("*"))
    # apt reads only *.list and *.sources there (not e.g. *.disabled files).
    sources = [Path("/etc/apt/sources.list")]
    sources += [p for p in listed if p.suffix in (".list", ".sources")]
    for path in sources:
        text = path.read_text(errors="replace") if path.is_file() else ""
        # One-line format: deb [options] URI SUITE COMPONENTS...
        for match in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if match.group(2) == suite:
                return match.group(1)
        # deb822 format: stanzas with URIs: and Suites: fields.
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:(.*)$", stanza, re.M)
            if uris and suites and suite in suites.group(1).split():
                return uris.group(1)
    return "http://deb.debian.org/debian"


def dockerfile_base(dockerfile: Path = DOCKERFILE) -> str:
    """The fully qualified image the Dockerfile's FROM resolves to by default."""
    text = dockerfile.read_text()
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    if match is None:
        raise ValueError(f"{dockerfile}: no ARG PYTHON_IMAGE default")
    name = match.group(1)
    return name if "/" in name else f"docker.io/library/{name}"


@dataclass
class Podman:
    """podman with its own storage and containers.conf under `home`."""

    home: Path = CACHE
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        conf = self.home / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        storage = self.home / "storage.conf"
        storage.write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{self.home / "storage"}"\n'
            f'runroot = "{self.home / "run"}"\n'
        )
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(conf),
            "CONTAINERS_STORAGE_CONF": str(storage),
        }

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 600, input: bytes | None = None
    ) -> subprocess.CompletedProcess:
        """Runs `podman ARGS`; text output; raises PodmanError on failure when check."""
        command = ["podman", *args]
        result = subprocess.run(
            command, env=self.env, capture_output=True, timeout=timeout, input=input
        )
        result.stdout = result.stdout.decode(errors="replace")
        result.stderr = result.stderr.decode(errors="replace")
        if check and result.returncode != 0:
            raise PodmanError(
                f"{' '.join(command)} -> {result.returncode}\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False).returncode == 0

    def inspect(self, name: str) -> dict:
        return json.loads(self("inspect", name).stdout)[0]

    def state(self, container: str) -> dict:
        return self.inspect(container)["State"]

    def logs(self, container: str) -> str:
        result = self("logs", container, check=False)
        return (result.stdout + result.stderr)[-4000:]

    def wait_healthy(self, container: str, timeout: float = 300.0) -> None:
        """Polls the image's own HEALTHCHECK (`podman healthcheck run`): no systemd runs it."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.state(container).get("Running"):
                raise PodmanError(f"{container} stopped:\n{self.logs(container)}")
            result = self("healthcheck", "run", container, check=False)
            if result.returncode == 0:
                return
            last = (result.stdout + result.stderr).strip()
            if "no defined healthcheck" in last:
                raise PodmanError(f"{container}: {last}")
            time.sleep(2.0)
        raise TimeoutError(
            f"{container} not healthy after {timeout}s ({last}):\n{self.logs(container)}"
        )

    # --- images ---------------------------------------------------------------------------

    def ensure_base(self, tag: str) -> None:
        """A Debian bookworm image tagged `tag` (debootstrap; the tarball is cached)."""
        if self.exists(tag):
            return
        tarball = self.home / "bookworm-python.tar"
        if not tarball.is_file():
            with tempfile.TemporaryDirectory(dir=self.home) as tmp:
                rootfs = Path(tmp) / "rootfs"
                command = [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={BASE_PACKAGES}",
                    "bookworm",
                    str(rootfs),
                    debian_mirror(),
                ]
                _run(command, timeout=900)
                part = tarball.with_suffix(".part")
                _run(
                    [
                        "tar",
                        "-C",
                        str(rootfs),
                        "--exclude=./var/lib/apt/lists/*",
                        "--exclude=./var/cache/apt/*",
                        "-cf",
                        str(part),
                        ".",
                    ],
                    timeout=300,
                )
                part.replace(tarball)
        self("import", "--change", 'CMD ["python3"]', str(tarball), tag, timeout=600)

    def build(
        self,
        tag: str,
        dockerfile: Path,
        context: Path,
        wheelhouse: Path | None = None,
        build_args: dict[str, str] | None = None,
    ) -> None:
        """`podman build --network none`; with a wheelhouse, pip installs only from it."""
        # Docker format: the OCI image format has no HEALTHCHECK, and the tests rely on it.
        args = ["build", "--format", "docker", "--network", "none", "--pull=never"]
        args += ["-t", tag, "-f", str(dockerfile)]
        if wheelhouse is not None:
            args += ["--volume", f"{wheelhouse}:/wheels:ro,z"]
            args += ["--build-arg", "PIP_NO_INDEX=1", "--build-arg", "PIP_FIND_LINKS=/wheels"]
        for key, value in (build_args or {}).items():
            args += ["--build-arg", f"{key}={value}"]
        self(*args, str(context), timeout=1500)
        # Images this tag replaced (earlier source versions) would pile up in the cache.
        self("image", "prune", "-f", check=False)


def wheelhouse(dest: Path = CACHE / "wheelhouse") -> Path:
    """Every wheel the server image installs, downloaded on the host (pinned, binary only).

    The projects themselves are built from source inside the image, so their build backend
    (setuptools) is here too; so is the facenet-pytorch wheel the MTCNN fetch step reads.
    """
    marker = dest / ".complete"
    # The image installs these local projects (client/ too once it is a distribution).
    projects = [p for p in (ROOT / "client", ROOT) if (p / "pyproject.toml").is_file()]
    stamp = (ROOT / "constraints.txt").read_text()
    stamp += "".join((p / "pyproject.toml").read_text() for p in projects)
    if marker.is_file() and marker.read_text() == stamp:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "-q", "-d", str(dest)]
    constraints = ["-c", str(ROOT / "constraints.txt")]
    # The image's requirements: the project's runtime deps plus what builds it.
    local = [f"{p}[openvino]" if p == ROOT else str(p) for p in projects]
    _run([*pip, *constraints, "--only-binary=:all:", *local, "setuptools>=69"], timeout=900)
    _run([*pip, "--no-deps", "--only-binary=:all:", "facenet-pytorch==2.6.0"], timeout=300)
    for stray in dest.glob("adaface[_-]*"):
        stray.unlink()  # the projects themselves are copied in as source
    marker.write_text(stamp)
    return dest


def debian_closure(names: list[str], status: str, dest: Path) -> Path:
    """`names` and every dependency a system with dpkg status `status` lacks, as .deb files.

    apt on the host resolves them against that status file (the image's, not the host's), so
    the set is exactly what `dpkg -i` in the image needs; downloaded once, kept in `dest`.
    """
    stamp = " ".join(names) + "\n" + hashlib.sha256(status.encode()).hexdigest()
    marker = dest / ".complete"
    if marker.is_file() and marker.read_text() == stamp:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "partial").mkdir(parents=True)
    status_file = dest / "status"
    status_file.write_text(status)
    command = ["apt-get", "install", "-y", "-q", "--download-only", "--no-install-recommends"]
    command += ["-o", f"Dir::State::status={status_file}", "-o", f"Dir::Cache::archives={dest}"]
    command += names
    for attempt in range(2):
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode == 0:
            break
        if attempt:
            raise RuntimeError(f"{' '.join(command)}: {result.stderr[-2000:]}")
        _run(["apt-get", "update", "-q"], timeout=600)  # no package lists yet
    for name in names:
        if not list(dest.glob(f"{name}_*.deb")):
            raise RuntimeError(f"{name} was not downloaded into {dest}")
    marker.write_text(stamp)
    return dest


def _run(command: list[str], timeout: float) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} -> {result.returncode}\n{result.stderr[-3000:]}")


def which_all(*tools: str) -> list[str]:
    """The tools missing from PATH (the Makefile target installs them with apt)."""
    return [tool for tool in tools if shutil.which(tool) is None]
