"""The container image without a Docker engine: the Dockerfile's essentials, and its entrypoint and
HEALTHCHECK commands run directly, configured the way the image configures them (the baked-in TOML plus
POP3D_* environment overrides)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

from pop3d import __version__
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
            env[k] = os.path.expandvars(v)  # PATH=/opt/pop3d/bin:$PATH
    return env


def _args() -> dict[str, str]:
    return {k: v.strip('"') for a in _all("ARG") for k, _, v in [a.partition("=")]}


def _stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, FROM first."""
    stages: list[list[tuple[str, str]]] = []
    for op, args in instructions():
        if op == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((op, args))
    return stages


def test_dockerfile_essentials():
    args = _args()
    bases = [a.split()[0].replace("${BASE}", args.get("BASE", "?")) for a in _all("FROM")]
    # every stage starts from the same Python 3.11 on Debian bookworm, pinned by digest
    assert len(set(bases)) == 1 and re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", bases[0]), bases
    assert len(bases) == 3  # deps, build, runtime
    users = _all("USER")
    assert users and users[-1] not in ("root", "0"), "the image must run unprivileged"
    exposed = {p for a in _all("EXPOSE") for p in a.split()}
    assert {"110", "995"} <= exposed
    assert json.loads(_all("VOLUME")[-1]) == ["/srv/mail", "/var/lib/pop3d"]
    (hc,) = _all("HEALTHCHECK")
    assert "--timeout=" in hc
    hc_cmd = _exec_form(hc.split("CMD", 1)[1].strip())
    assert hc_cmd[:2] == ["pop3d", "health"]
    # no address: the check follows the configuration (listen address, PROXY, TLS), as the server does
    assert not [a for a in hc_cmd[2:] if ":" in a], hc_cmd
    assert _exec_form(_all("ENTRYPOINT")[-1]) == ["pop3d"]
    assert _exec_form(_all("CMD")[-1]) == ["serve"]
    assert _all("STOPSIGNAL") == ["SIGTERM"]
    env = _env()
    assert env["PYTHONUNBUFFERED"] == "1" and env["POP3D_CONFIG_FILE"] == "/etc/pop3d/pop3d.toml"
    assert env["PATH"].startswith("/opt/pop3d/bin:")
    for args_ in _all("COPY"):
        parts = [p for p in args_.split() if not p.startswith("--")]
        if "--from=" in args_:
            continue
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} missing"
            assert f"!{src.rstrip('/')}" in _dockerignore(), f"COPY source {src} is not in .dockerignore's allowlist"
    # the baked-in config is valid and points at the volumes the README documents
    s = load_settings(ROOT / "contrib" / "docker" / "pop3d.toml")
    assert s.server.listen == ["0.0.0.0:110"] and str(s.auth.passwd_file) == "/etc/pop3d/passwd"
    assert s.storage.location.startswith("/srv/mail/")
    assert s.server.workers == 0  # one per CPU the container may use (pop3d.runtime.cpus)


def _dockerignore() -> list[str]:
    return [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")
    ]


def test_dockerignore_is_an_allowlist():
    lines = _dockerignore()
    assert lines[0] == "*", "everything not named is left out of the build context"
    assert "**/__pycache__" in lines[lines.index("!pop3d") :]  # re-excluded after the package is allowed


def test_dependencies_come_from_the_lock_before_the_code():
    deps, build, runtime = _stages()
    # the dependency stage sees the lock and nothing of the source
    copies = [a for op, a in deps if op == "COPY"]
    assert copies == ["requirements.lock /tmp/requirements.lock"], copies
    (install,) = [a for op, a in deps if op == "RUN" and "pip" in a and "install" in a]
    assert "--require-hashes" in install and "-r /tmp/requirements.lock" in install
    assert "--mount=type=cache" in install  # downloads are cached across builds, not stored in a layer
    # the build stage installs its backend from a lock too, before it copies the code
    ops = [(op, a) for op, a in build if op in ("COPY", "RUN")]
    code = ops.index(("COPY", "pop3d ./pop3d"))
    backend = [i for i, (op, a) in enumerate(ops) if op == "RUN" and "-r /tmp/build.lock" in a]
    assert backend and backend[0] < code and "--require-hashes" in ops[backend[0]][1]
    # the runtime stage: the dependencies' layer, then pop3d from a bind-mounted wheel (no wheel in any layer)
    steps = [(op, a) for op, a in runtime if op in ("COPY", "RUN")]
    venv = steps.index(("COPY", "--from=deps /opt/pop3d /opt/pop3d"))
    (wheel,) = [i for i, (op, a) in enumerate(steps) if "--mount=type=bind,from=build" in a]
    assert venv < wheel and "--no-index" in steps[wheel][1] and "--no-deps" in steps[wheel][1]
    assert not [a for op, a in steps if op == "COPY" and "--from=build" in a], "a wheel copied into a layer stays there"
    assert not [a for op, a in steps if "rm -rf /wheel" in a]


def _lock(path: Path) -> dict[str, str]:
    """name -> version of a pip-compile lock, checking that every requirement is pinned and hashed."""
    pins: dict[str, str] = {}
    text = path.read_text()
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        first = block.splitlines()[0]
        if first.startswith("#") or not first.strip():
            continue
        m = re.match(r"([A-Za-z0-9_.-]+)==([^ ;\\]+)", first)
        assert m, f"{path.name}: {first!r} is not an exact pin"
        assert "--hash=sha256:" in block, f"{path.name}: {m[1]} has no hash"
        pins[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
    return pins


def test_the_lock_covers_the_dependencies_and_names_its_command():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = _lock(ROOT / "requirements.lock")
    for req in project["project"]["dependencies"]:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", req)[0]).lower()  # type: ignore[index]
        assert name in runtime, f"{name} (pyproject.toml) is not in requirements.lock: run contrib/docker/lock.sh"
    assert "pop3d" not in runtime
    assert "setuptools" in _lock(ROOT / "contrib" / "docker" / "build.lock")
    script = ROOT / "contrib" / "docker" / "lock.sh"
    assert os.access(script, os.X_OK)
    for lock in ("requirements.lock", "contrib/docker/build.lock"):
        assert "contrib/docker/lock.sh" in (ROOT / lock).read_text().split("\n\n")[0], lock
        assert lock in script.read_text()
    # the lock is for the base image's Python
    assert "Python 3.11" in (ROOT / "requirements.lock").read_text().splitlines()[1]


def test_oci_labels():
    labels = dict(item.split("=", 1) for item in shlex.split(" ".join(_all("LABEL"))))
    for key in ("source", "version", "licenses", "revision", "title"):
        assert f"org.opencontainers.image.{key}" in labels, key
    assert _args()["VERSION"] == __version__ and labels["org.opencontainers.image.version"] == "${VERSION}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert labels["org.opencontainers.image.licenses"] == project["project"]["license"]["text"]


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
    hc = _exec_form(_all("HEALTHCHECK")[0].split("CMD", 1)[1].strip())  # as is: it reads POP3D_SERVER__LISTEN
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


def test_healthcheck_follows_a_tls_only_proxy_configuration(tmp_path):
    """The image's HEALTHCHECK, unchanged, against the image's config moved to implicit TLS behind the PROXY
    protocol on another port: it probes the way a client (here HAProxy) reaches the server."""
    from tls_helpers import Pki

    pki = Pki.make(tmp_path)
    (tmp_path / "passwd").write_text("alice:{PLAIN}wonderland\n")
    (tmp_path / "mail").mkdir()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POP3D_")}
    env.update(_env())
    env.update(
        POP3D_CONFIG_FILE=str(ROOT / "contrib" / "docker" / "pop3d.toml"),
        POP3D_SERVER__LISTEN="[]",
        POP3D_SERVER__TLS_LISTEN=f'["127.0.0.1:{port}"]',
        POP3D_SERVER__PROXY_PROTOCOL="true",
        POP3D_SERVER__WORKERS="1",
        POP3D_SERVER__SHUTDOWN_GRACE="1",
        POP3D_SERVER__STATE_DIR=str(tmp_path / "state"),
        POP3D_TLS__CERT=str(pki.server_pem),
        POP3D_TLS__KEY=str(pki.server_pem),
        POP3D_AUTH__PASSWD_FILE=str(tmp_path / "passwd"),
        POP3D_STORAGE__LOCATION=str(tmp_path / "mail" / "{user}" / "Maildir"),
        PYTHONPATH=str(ROOT),
    )
    cmd = _as_module(_exec_form(_all("ENTRYPOINT")[-1]) + _exec_form(_all("CMD")[-1]))
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    hc = _as_module(_exec_form(_all("HEALTHCHECK")[0].split("CMD", 1)[1].strip()))
    try:
        deadline = time.monotonic() + 20
        while True:
            res = subprocess.run(hc, env=env, capture_output=True, text=True, timeout=30)
            if res.returncode == 0 or time.monotonic() > deadline or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert res.returncode == 0, (res.stdout, res.stderr)
        assert res.stdout.startswith("healthy: +OK pop3d ready")
        # the old hard-coded probe (plain, no header, port 110) would not have reached this server
        plain = subprocess.run(
            [*hc, f"127.0.0.1:{port}", "--timeout", "1"], env=env, capture_output=True, text=True, timeout=30
        )
        assert plain.returncode == 1, (plain.stdout, plain.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = (proc.stdout.read() if proc.stdout else b"").decode()
    # one listener, the TLS one; the probe's session ends with QUIT and no user (its mark in the log)
    assert f"listening on 127.0.0.1:{port}" in log and "reason=QUIT" in log, log


def test_readme_container_section():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### In a container") :]
    section = section[: section.index("\n### ", 5)]
    for needed in ("docker build -t pop3d .", "podman build --format docker", "contrib/docker/lock.sh", "--build-arg"):
        assert needed in section, needed
