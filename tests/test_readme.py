"""README "Run it for real": its shell commands, run as written in a scratch directory.

Every absolute path the commands write to is moved under the scratch directory, and the three commands that
would change this machine beyond files (`useradd`, `runuser`, `systemctl`) are stand-ins that record their
arguments (`runuser` then runs its command as the current user). The install lines (`python3 -m venv`,
`pip install`) need a package index and ~20 s, so here a wrapper stands in for the installed command and
`.ci/run` runs those lines for real:

    python3 tests/test_readme.py install PREFIX | bash -eu    # PREFIX/usr/local/bin/pop3d
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SECTION = "## Run it for real"

#: absolute paths the commands may write to; each is moved under the scratch directory
MOVED = ("/opt/pop3d", "/usr/local/bin", "/etc/pop3d", "/etc/systemd/system", "/srv/mail")
#: absolute paths that are only read or only arguments (of the stand-ins)
KEPT = ("/nonexistent", "/usr/sbin/nologin")
INSTALL = re.compile(r"\bpython3 -m venv\b|\bpip install\b")
STAND_INS = ("useradd", "runuser", "systemctl")


def section_commands(text: str | None = None) -> list[str]:
    """The command lines of the ```sh blocks of README "Run it for real" (up to its first subsection)."""
    text = README.read_text() if text is None else text
    start = text.index(SECTION)
    end = text.find("\n#", start + len(SECTION))
    body = text[start : end if end != -1 else len(text)]
    lines: list[str] = []
    for block in re.findall(r"^```sh\n(.*?)^```$", body, re.S | re.M):
        lines += [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return lines


def relocate(line: str, prefix: Path) -> str:
    """`line` with every MOVED path under `prefix`; any other absolute path is an error (it could write here)."""
    out = line
    for path in MOVED:
        out = re.sub(rf"(?<![\w/]){re.escape(path)}(?=[/\s]|$)", f"{prefix}{path}", out)
    code = out.split(" #", 1)[0]
    for word in shlex.split(code):
        for part in word.split("="):
            if part.startswith("/") and not part.startswith((str(prefix), *KEPT)):
                raise AssertionError(f"README command writes or reads {part!r}: add it to MOVED or KEPT: {line}")
    return out


def install_lines(prefix: Path) -> list[str]:
    """The whole first block (the install), relocated: what `.ci/run` runs for real."""
    lines = section_commands()
    first_other = next(i for i, ln in enumerate(lines) if not INSTALL.search(ln) and not ln.startswith("ln "))
    return [relocate(ln, prefix) for ln in lines[:first_other]]


def _stand_ins(bindir: Path, log: Path) -> None:
    bindir.mkdir(parents=True)
    for name in STAND_INS:
        script = f'#!/bin/sh\nprintf "%s\\n" "{name} $*" >> {shlex.quote(str(log))}\n'
        if name == "runuser":  # runuser -u USER -- CMD...: run CMD as the current user
            script += 'while [ "$1" != "--" ]; do shift; done; shift; exec "$@"\n'
        (bindir / name).write_text(script)
        (bindir / name).chmod(0o755)


def test_section_has_every_step():
    lines = section_commands()
    text = "\n".join(lines)
    for step in ("python3 -m venv", "pip install .", "/etc/pop3d", "config.example.toml", "pop3d passwd"):
        assert step in text, step
    for step in ("check-config", "contrib/systemd/pop3d.service", "systemctl enable"):
        assert step in text, step
    assert any(INSTALL.search(ln) for ln in install_lines(Path("/scratch"))), "no install line"


def test_ci_runs_the_install_lines():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "tests/test_readme.py install" in ci


@pytest.mark.skipif(os.geteuid() != 0, reason="the commands chgrp to group mail, as root does")
def test_run_it_for_real(tmp_path):
    from pop3d.auth.schemes import split_scheme, verify

    scratch = tmp_path / "root"
    log = tmp_path / "stand-ins.log"
    _stand_ins(tmp_path / "stand-ins", log)
    # the installed command: this checkout's pop3d, where `pip install` would have put it
    venv_bin = scratch / "opt/pop3d/bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "pop3d").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m pop3d "$@"\n')
    (venv_bin / "pop3d").chmod(0o755)
    for existing in ("usr/local/bin", "etc/systemd/system"):  # there on any Debian machine
        (scratch / existing).mkdir(parents=True)

    commands = [relocate(ln, scratch) for ln in section_commands() if not INSTALL.search(ln)]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("POP3D_")},
        "PATH": f"{tmp_path / 'stand-ins'}:{scratch / 'usr/local/bin'}:{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        # the copied config.example.toml names the real paths; the moved ones replace them, as variables
        "POP3D_AUTH__PASSWD_FILE": f"{scratch}/etc/pop3d/passwd",
        "POP3D_STORAGE__LOCATION": f"{scratch}/srv/mail/{{user}}/Maildir",
        "POP3D_SERVER__STATE_DIR": f"{scratch}/var/lib/pop3d",
    }
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", "\n".join(commands)],
        cwd=ROOT,
        env=env,
        input="alice's password\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "configuration OK" in r.stdout, r.stdout

    etc = scratch / "etc/pop3d"
    assert (etc / "pop3d.toml").read_text() == (ROOT / "config.example.toml").read_text()
    passwd = (etc / "passwd").read_text().splitlines()
    assert len(passwd) == 1 and passwd[0].startswith("alice:{ARGON2ID}")
    assert verify(*split_scheme(passwd[0].split(":", 1)[1]), "alice's password")
    assert stat.S_IMODE((etc / "passwd").stat().st_mode) == 0o640
    assert (scratch / "srv/mail").is_dir()
    assert os.readlink(scratch / "usr/local/bin/pop3d") == f"{scratch}/opt/pop3d/bin/pop3d"

    calls = log.read_text().splitlines()
    useradd = next(c for c in calls if c.startswith("useradd "))
    units = scratch / "etc/systemd/system"
    service = (units / "pop3d.service").read_text()
    # the account made is the one the unit runs as, in the group the passwd-file and mail store were given
    user = useradd.split()[-1]
    assert f"User={user}" in service and "Group=mail" in service and "--gid mail" in useradd
    assert f"runuser -u {user} -- pop3d check-config --config {etc}/pop3d.toml" in calls
    assert "/usr/local/bin/pop3d" in service  # the link made above
    enabled = next(c for c in calls if c.startswith("systemctl enable"))
    for unit in enabled.split()[3:]:
        assert (units / unit).is_file(), unit
    assert calls.index("systemctl daemon-reload") < calls.index(enabled)


if __name__ == "__main__":  # `.ci/run`: print the install lines, relocated under PREFIX
    if len(sys.argv) != 3 or sys.argv[1] != "install":
        sys.exit("usage: python3 tests/test_readme.py install PREFIX")
    print("\n".join(install_lines(Path(sys.argv[2]).resolve())))
