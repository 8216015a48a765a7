"""The container image without a Docker engine: the Dockerfile's essentials, and its entrypoint and
HEALTHCHECK commands run directly, configured the way the image configures them (the baked-in TOML plus
POP3D_* environment overrides)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pop3d.config import load_settings

ROOT = Path(__file__).resolve().parent.parent


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        op, _, args = line.partition(" ")
        out.append((op.upper(), args.strip()))
    return out


def _all(op: str) -> list[str]:
    return [a for o, a in instructions() if o == op]


def _exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list), f"{text} should be the exec (JSON) form, so signals reach pop3d"
    return value


def _env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _all("ENV"):
        for item in shlex.split(args):
            k, _, v = item.partition("=")
            env[k] = v
    return env


def test_dockerfile_essentials():
    args = {k: v for a in _all("ARG") for k, _, v in [a.partition("=")]}
    bases = [a.split()[0].replace("${PYTHON_VERSION}", args.get("PYTHON_VERSION", "?")) for a in _all("FROM")]
    assert bases and all(b.startswith("python:3.11") and b.endswith("-slim") for b in bases), bases
    assert len(bases) == 2  # build stage + runtime stage
    users = _all("USER")
    assert users and users[-1] not in ("root", "0"), "the image must run unprivileged"
    exposed = {p for a in _all("EXPOSE") for p in a.split()}
    assert {"110", "995"} <= exposed
    assert "/srv/mail" in json.loads(_all("VOLUME")[-1])
    (hc,) = _all("HEALTHCHECK")
    assert "--timeout=" in hc
    hc_cmd = _exec_form(hc.split("CMD", 1)[1].strip())
    assert hc_cmd[:2] == ["pop3d", "health"]
    assert _exec_form(_all("ENTRYPOINT")[-1]) == ["pop3d"]
    assert _exec_form(_all("CMD")[-1]) == ["serve"]
    assert _all("STOPSIGNAL") == ["SIGTERM"]
    env = _env()
    assert env["PYTHONUNBUFFERED"] == "1" and env["POP3D_CONFIG_FILE"] == "/etc/pop3d/pop3d.toml"
    for args_ in _all("COPY"):
        parts = [p for p in args_.split() if not p.startswith("--")]
        if "--from=" in args_:
            continue
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} missing"
    # the baked-in config is valid and points at the volumes the README documents
    s = load_settings(ROOT / "contrib" / "docker" / "pop3d.toml")
    assert s.server.listen == ["0.0.0.0:110"] and str(s.auth.passwd_file) == "/etc/pop3d/passwd"
    assert s.storage.location.startswith("/srv/mail/")


def _free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def _as_module(cmd: list[str]) -> list[str]:
    assert cmd[0] == "pop3d"
    return [sys.executable, "-m", "pop3d", *cmd[1:]]


def test_entrypoint_and_healthcheck_run_directly(tmp_path):
    (tmp_path / "passwd").write_text("alice:{PLAIN}wonderland\n")
    (tmp_path / "mail").mkdir()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POP3D_")}
    env.update(_env())
    # what `docker run -v ... -e POP3D_...` would do; the TOML is the one the image copies to /etc/pop3d
    env.update(
        POP3D_CONFIG_FILE=str(ROOT / "contrib" / "docker" / "pop3d.toml"),
        POP3D_SERVER__LISTEN=f'["127.0.0.1:{port}"]',
        POP3D_SERVER__SHUTDOWN_GRACE="5",
        POP3D_AUTH__PASSWD_FILE=str(tmp_path / "passwd"),
        POP3D_STORAGE__LOCATION=str(tmp_path / "mail" / "{user}" / "Maildir"),
        PYTHONPATH=str(ROOT),
    )
    cmd = _as_module(_exec_form(_all("ENTRYPOINT")[-1]) + _exec_form(_all("CMD")[-1]))
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout or []), daemon=True)
    reader.start()
    hc = _exec_form(_all("HEALTHCHECK")[0].split("CMD", 1)[1].strip())
    hc = [a.replace("127.0.0.1:110", f"127.0.0.1:{port}") for a in hc]
    try:
        deadline = time.monotonic() + 20
        while True:
            res = subprocess.run(_as_module(hc), env=env, capture_output=True, text=True, timeout=30)
            if res.returncode == 0 or time.monotonic() > deadline or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert res.returncode == 0, (res.stdout, res.stderr, b"".join(out))
        assert res.stdout.startswith("healthy: +OK pop3d ready")
        # a session in progress when SIGTERM arrives is allowed to finish (drain)
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        f = c.makefile("rb")
        assert f.readline().startswith(b"+OK")
        c.sendall(b"USER alice\r\nPASS wonderland\r\n")
        assert f.readline().startswith(b"+OK") and f.readline().startswith(b"+OK alice")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # not a timing assert: just let the signal land before the next command
        c.sendall(b"STAT\r\nQUIT\r\n")
        assert f.readline().startswith(b"+OK 0 0") and f.readline().startswith(b"+OK")
        c.close()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    log = b"".join(out).decode()
    assert "listening on 127.0.0.1:" in log and "session end user=alice" in log and "stopped" in log
