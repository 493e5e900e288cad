"""The ``cocoon-node`` command line, run as real processes on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

pytestmark = pytest.mark.slow


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["COCOON_HOME"] = str(home)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class _Node:
    """A node process whose stdout we read line by line."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._buf = b""

    async def readline(self) -> str:
        assert self.proc.stdout is not None
        while b"\n" not in self._buf:
            chunk = await self.proc.stdout.receive_some(4096)
            if not chunk:
                raise AssertionError(f"node exited early: {self._buf!r}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    async def wait_up(self) -> list[str]:
        lines = []
        while True:
            line = await self.readline()
            lines.append(line)
            if line.startswith("Ctrl-C"):
                return lines


async def _start(home: Path, *args: str) -> _Node:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "node.cli", *args, "--log-level", "warning"],
        env=_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    return _Node(proc)


async def _stop(node: _Node) -> int:
    node.proc.send_signal(signal.SIGINT)
    with trio.fail_after(20):
        return await node.proc.wait()


def test_init_is_idempotent_and_status_without_node_says_what_to_do(tmp_path: Path) -> None:
    first = _cli(tmp_path, "init")
    assert first.returncode == 0, first.stderr
    assert "created identity 12D3KooW" in first.stdout
    again = _cli(tmp_path, "init")
    assert "found identity" in again.stdout
    assert first.stdout.split()[2] == again.stdout.split()[2]
    st = _cli(tmp_path, "status")
    assert st.returncode == 2
    assert "no node is running" in st.stderr
    assert "cocoon-node join" in st.stderr


def test_bad_input_gives_one_line_errors(tmp_path: Path) -> None:
    r = _cli(tmp_path, "init", "--network", "nosuchnet")
    assert r.returncode == 2
    assert "unknown network 'nosuchnet'" in r.stderr
    r = _cli(tmp_path, "init", "--set", "overlay.listen_port=abc")
    assert r.returncode == 2
    assert "expected int" in r.stderr
    (tmp_path / "identity.key").write_text("broken")
    r = _cli(tmp_path, "init")
    assert r.returncode == 2
    assert "identity.key is corrupt" in r.stderr
    assert "Traceback" not in r.stderr


async def test_bootstrap_join_peers_status_and_clean_stop(tmp_path: Path) -> None:
    boot = await _start(tmp_path / "boot", "bootstrap", "--port", "0", "--no-proxy")
    with trio.fail_after(60):
        lines = await boot.wait_up()
    boot_addr = next(line.strip() for line in lines if "/p2p/" in line)
    member = await _start(tmp_path / "member", "join", "--bootstrap", boot_addr, "--network", "testnet")
    with trio.fail_after(60):
        await member.wait_up()
        peers = await trio.to_thread.run_sync(_cli, tmp_path / "member", "peers")
        status = await trio.to_thread.run_sync(_cli, tmp_path / "boot", "status", "--json")
    assert boot_addr.rsplit("/", 1)[1] in peers.stdout
    assert '"roles": [\n    "bootstrap"' in status.stdout
    assert await _stop(member) == 0
    assert await _stop(boot) == 0
    assert not (tmp_path / "boot" / "control.sock").exists()
