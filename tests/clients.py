"""Driving real registry clients from tests.

Every client gets private state under a directory the test owns, and every
"insecure" switch is explicit, so nothing on the host is read or changed.
The runtime flags are what this kind of machine needs: root without
CAP_SYS_RESOURCE (so explicit ulimits), cgroup v1 hybrid mode (so runc, not
crun), and no container networking.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

TIMEOUT = 180
PODMAN_RUN_FLAGS = ["--runtime", "runc", "--ulimit", "nofile=1024:1024",
                    "--ulimit", "nproc=1024:1024", "--network", "none"]  # fmt: skip


def run(
    argv: list[str], timeout: float = TIMEOUT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    if proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def skopeo_copy(registry: str, image: str, dest: Path, tag: str = "latest") -> None:
    run(
        [
            "skopeo",
            "copy",
            "--src-tls-verify=false",
            f"docker://{registry}/{image}",
            f"oci:{dest}:{tag}",
        ]
    )


def skopeo_inspect(
    registry: str, image: str, raw: bool = False, flags: tuple[str, ...] = ()
) -> dict:
    argv = ["skopeo", *flags, "inspect", "--tls-verify=false"] + (["--raw"] if raw else [])
    return json.loads(run([*argv, f"docker://{registry}/{image}"]).stdout)


def umoci_unpack(layout: Path, bundle: Path, tag: str = "latest") -> Path:
    run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)])
    return bundle / "rootfs"


def bwrap_run(rootfs: Path, *command: str) -> str:
    """Run a command inside an unpacked image with nothing from the host."""
    argv = ["bwrap", "--bind", str(rootfs), "/", "--proc", "/proc", "--dev", "/dev",
            "--tmpfs", "/tmp", "--unshare-all", "--die-with-parent", "--new-session",
            "--clearenv", "--setenv", "PATH", "/bin:/usr/bin", "--", *command]  # fmt: skip
    return run(argv).stdout


def unmount_under(root: Path) -> None:
    """Lazily unmount whatever a runtime left mounted below `root`, deepest first."""
    prefix = str(root).rstrip("/") + "/"
    with open("/proc/self/mounts") as fh:
        targets = [line.split()[1] for line in fh]
    for target in sorted((t for t in targets if t.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


class ContainersTool:
    """podman or buildah with storage, run state and registries.conf of its own."""

    def __init__(self, program: str):
        self.program = program
        # A short path: podman refuses a run root longer than 50 characters.
        self.home = Path(tempfile.mkdtemp(prefix=f"nixery-{program}-"))
        # No search registries and no host configuration of registries.
        (self.home / "registries.conf").write_text("unqualified-search-registries = []\n")

    def argv(self, *args: str) -> list[str]:
        base = [self.program, "--root", str(self.home / "root"),
                "--runroot", str(self.home / "run"), "--storage-driver", "overlay"]  # fmt: skip
        if self.program == "podman":
            base += ["--tmpdir", str(self.home / "tmp"), "--cgroup-manager", "cgroupfs",
                     "--events-backend", "file"]  # fmt: skip
        return [*base, *args]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(self.home / "registries.conf")}

    def __call__(self, *args: str) -> str:
        return run(self.argv(*args), env=self.env).stdout

    def close(self) -> None:
        cleanup = [("rm", "--all")] if self.program == "buildah" else []
        for args in [*cleanup, ("rmi", "--all", "--force")]:
            subprocess.run(self.argv(*args), env=self.env, capture_output=True, timeout=TIMEOUT)
        unmount_under(self.home)
        shutil.rmtree(self.home, ignore_errors=True)


class Containerd:
    """A private containerd daemon with its own config, state and socket."""

    def __init__(self) -> None:
        # A short path: the socket's must fit in sun_path (108 bytes).
        self.home = Path(tempfile.mkdtemp(prefix="nixery-ctrd-"))
        self.socket = self.home / "sock"
        config = self.home / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.home}/root"\n'
            f'state = "{self.home}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
        )
        with open(self.home / "containerd.log", "wb") as log:
            self.process = subprocess.Popen(
                ["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while subprocess.run(self.argv("version"), capture_output=True).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                log_text = (self.home / "containerd.log").read_text(errors="replace")
                raise RuntimeError("containerd did not start:\n" + log_text[-2000:])
            time.sleep(0.1)

    def argv(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.socket), "--namespace", "nixery-tests", *args]

    def __call__(self, *args: str) -> str:
        return run(self.argv(*args)).stdout

    def run_container(self, ref: str, name: str, *command: str) -> str:
        """What `command` printed in a new container of `ref`. The shim writes
        it to a file: through ctr's own pipes, a process that exits at once
        may lose its output (ctr then prints nothing and exits 0)."""
        output = self.home / f"{name}.out"
        self("run", "--rm", "--log-uri", f"file://{output}", ref, name, *command)
        text = output.read_text()
        output.unlink()
        return text

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        unmount_under(self.home)
        shutil.rmtree(self.home, ignore_errors=True)
