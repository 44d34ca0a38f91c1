"""Build the catsdogs images with podman, passing this machine's pip settings in without baking them in.

    python3 container/image.py base                                  # localhost/debian:bookworm, once
    python3 container/image.py build --target serve --target full    # catsdogs:serve, catsdogs:full
    python3 container/image.py sizes                                 # their sizes, as docs/container.md

pip inside the build must see the package indexes the host's pip sees: its configuration files and
``PIP_*`` environment (here: a find-links folder holding the CPU torch wheel, two file:// indexes and a
CA bundle). ``pip config list`` gives them merged; they are written into one pip.conf passed as a
build *secret* (mounted only while a RUN step runs, never in a layer), and every local file or folder
they name is bind-mounted read-only into the build. podman reads its settings from
``container/containers.conf`` (runc; no default ulimits) and builds and runs with ``--network host``:
both were needed on these machines. Without a registry, the base is Debian's own bookworm made with
mmdebstrap and imported (:func:`ensure_base`). Standard library only.
"""

from __future__ import annotations

import argparse
import configparser
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS_CONF = Path(__file__).resolve().parent / "containers.conf"
LOCAL_BASE = "localhost/debian:bookworm"
"""The base image made from Debian's packages (the Containerfile's default is the public python slim)."""
TARGETS = ("serve", "full")
DEFAULT_TAG = "catsdogs"
PATH_KEYS = {"find-links", "extra-index-url", "index-url", "constraint", "requirement", "cert", "client-cert"}
"""pip settings whose values may name local files or folders (which the build must see)."""


def podman_env() -> dict[str, str]:
    """The environment for podman: its settings from container/containers.conf, nothing under /etc."""
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, check: bool = True, capture: bool = False, timeout: float | None = None
           ) -> subprocess.CompletedProcess[str]:
    """Run ``podman ARGS`` with the project's settings."""
    return subprocess.run(["podman", *args], env=podman_env(), check=check, text=True, timeout=timeout,
                          capture_output=capture)


def runtime_problem() -> str | None:
    """Why no container can run here (one line), or None when podman, runc and a container work."""
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make container-tools installs podman, runc, mmdebstrap)"
    try:
        info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, capture=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"podman info failed: {exc}"
    if info.returncode != 0:
        return f"podman info failed: {(info.stderr or info.stdout).strip().splitlines()[-1:]}"
    return None


def host_pip_settings(python: str = sys.executable) -> dict[str, dict[str, str]]:
    """This machine's effective pip settings, ``{section: {key: value}}`` (env vars as ``global``)."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], check=True, capture_output=True, text=True,
                         env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}).stdout
    settings: dict[str, dict[str, str]] = {}
    env_values: dict[str, str] = {}
    for line in out.splitlines():
        name, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip().strip("'\"")
        if name.startswith(":env:."):  # PIP_FIND_LINKS and friends win over the files
            env_values[name.removeprefix(":env:.")] = value
            continue
        section, _, key = name.partition(".")
        settings.setdefault(section, {})[key] = value
    settings.setdefault("global", {}).update(env_values)
    return settings


def local_paths(settings: dict[str, dict[str, str]]) -> list[Path]:
    """The existing local folders the settings name or hold their files (file:// URLs included), sorted."""
    found: set[Path] = set()
    for values in settings.values():
        for key, value in values.items():
            if key not in PATH_KEYS:
                continue
            for item in value.split():
                path = Path(item.removeprefix("file://")) if item.startswith(("/", "file://")) else None
                if path is None or not path.exists():
                    continue
                # A file:// index URL names .../simple; mount the index folder that holds its files too.
                # A file is mounted by its folder: podman leaves every mount point in the RUN layers, and
                # a file's would stay as an empty file of that name (the test finds none below /run/host-pip).
                folder = path.is_file() or (item.startswith("file://") and path.name == "simple")
                found.add(path.parent if folder else path)
    return sorted(found)


MOUNT_ROOT = "/run/host-pip"
"""Where the host's pip files appear inside the build: under their own path below it, never over the
image's own files (the host's CA bundle mounted at /etc/ssl/certs broke Debian's ca-certificates)."""


def inside(path: Path) -> str:
    """The path of a host file inside the build."""
    return f"{MOUNT_ROOT}{path}"


def relocated(settings: dict[str, dict[str, str]], mounts: list[Path]) -> dict[str, dict[str, str]]:
    """The settings with every mounted local path rewritten to where the build sees it."""
    out: dict[str, dict[str, str]] = {}
    for section, values in settings.items():
        out[section] = {}
        for key, value in values.items():
            if key in PATH_KEYS:
                items = []
                for item in value.split():
                    for path in mounts:
                        if item.startswith(str(path)) or item.startswith(f"file://{path}"):
                            item = item.replace(str(path), inside(path), 1)
                            break
                    items.append(item)
                value = " ".join(items)
            out[section][key] = value
    return out


def has_cpu_torch(paths: list[Path]) -> bool:
    """True when a mounted find-links folder holds a CPU torch wheel (then no PyTorch index is needed)."""
    return any(p.is_dir() and any(p.glob("torch-*+cpu-*.whl")) for p in paths)


def write_pip_conf(settings: dict[str, dict[str, str]], path: Path) -> None:
    """Write the settings as one pip.conf."""
    conf = configparser.ConfigParser(interpolation=None)
    for section, values in settings.items():
        conf[section] = values
    with path.open("w") as f:
        conf.write(f)


def ensure_base(tag: str = LOCAL_BASE) -> float:
    """Make the local Debian bookworm base image unless it exists; return the seconds it took."""
    if podman("image", "exists", tag, check=False).returncode == 0:
        return 0.0
    if shutil.which("mmdebstrap") is None:
        raise SystemExit("mmdebstrap is missing: make container-tools installs it")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="catsdogs-base-") as tmp:
        tar = Path(tmp) / "base.tar"
        subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", "bookworm", str(tar)], check=True)
        podman("import", "--quiet", str(tar), tag)
    return time.monotonic() - start


def build_command(target: str, tag: str, base: str | None, pip_conf: Path, mounts: list[Path],
                  torch_index: str | None) -> list[str]:
    """The ``podman build`` command line of one target."""
    cmd = ["build", "--network", "host", "--format", "docker", "--target", target, "--tag", f"{tag}:{target}",
           "--secret", f"id=pipconf,src={pip_conf}", "--file", str(ROOT / "Containerfile")]
    if base:
        cmd += ["--build-arg", f"BASE={base}"]
    if torch_index is not None:
        cmd += ["--build-arg", f"TORCH_INDEX={torch_index}"]
    for path in mounts:
        cmd += ["--volume", f"{path}:{inside(path)}:ro"]
    return [*cmd, str(ROOT)]


def build(targets: list[str], tag: str, base: str | None, log: bool = True) -> dict[str, float]:
    """Build each target with the host's pip settings; return the seconds each took."""
    settings = host_pip_settings()
    mounts = local_paths(settings)
    # With the CPU torch in a find-links folder the PyTorch index is not needed (nor reachable here).
    torch_index = "" if has_cpu_torch(mounts) else None
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="catsdogs-pip-") as tmp:
        pip_conf = Path(tmp) / "pip.conf"
        write_pip_conf(relocated(settings, mounts), pip_conf)
        for target in targets:
            cmd = build_command(target, tag, base, pip_conf, mounts, torch_index)
            if log:
                print("+ podman " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
            start = time.monotonic()
            podman(*cmd)
            times[target] = time.monotonic() - start
            if log:
                print(f"{tag}:{target} built in {times[target]:.0f} s", file=sys.stderr, flush=True)
    return times


def image_size(ref: str) -> int:
    """The image's size in bytes, as ``podman image inspect`` reports it."""
    out = podman("image", "inspect", "--format", "{{.Size}}", ref, capture=True).stdout
    return int(out.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("base", help=f"make {LOCAL_BASE} with mmdebstrap unless it exists")
    b = sub.add_parser("build", help="build image targets with the host's pip settings")
    b.add_argument("--target", action="append", choices=TARGETS, default=None)
    b.add_argument("--tag", default=DEFAULT_TAG)
    b.add_argument("--base", default=None, help=f"base image (default: make and use {LOCAL_BASE})")
    s = sub.add_parser("sizes", help="print the size of each built target")
    s.add_argument("--tag", default=DEFAULT_TAG)
    args = parser.parse_args(argv)
    problem = runtime_problem()
    if problem:
        print(f"image.py: {problem}", file=sys.stderr)
        return 2
    if args.command == "base":
        print(f"{LOCAL_BASE}: ready ({ensure_base():.0f} s)")
    elif args.command == "build":
        base = args.base
        if base is None:
            ensure_base()
            base = LOCAL_BASE
        build(args.target or list(TARGETS), args.tag, base)
    else:
        for target in TARGETS:
            ref = f"{args.tag}:{target}"
            if podman("image", "exists", ref, check=False).returncode == 0:
                print(f"{ref}\t{image_size(ref) / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
