"""pop3d.auth.generation: a password changed by one worker is in force on every worker at the next login."""

from __future__ import annotations

import os
from pathlib import Path

from pop3d.auth import schemes
from pop3d.auth.generation import Generation
from pop3d.auth.passwd_file import PasswdFileAuthenticator


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "passwd"
    path.write_text("alice:{PLAIN}old-password\nbob:{PLAIN}bobs-password\n")
    return path


async def test_a_change_by_one_worker_is_seen_by_another_at_once(tmp_path: Path) -> None:
    """Two authenticators on one file stand for two workers; each would look at the file only once an hour."""
    path, gen = _file(tmp_path), Generation()
    a = PasswdFileAuthenticator(path, min_check_interval=3600, generation=gen)
    b = PasswdFileAuthenticator(path, min_check_interval=3600, generation=gen)
    assert await b.verify("alice", "old-password") is not None
    assert await a.set_secret("alice", schemes.hash_password("PLAIN", "new-password-1"))
    assert await b.verify("alice", "old-password") is None  # no second with the old password
    assert await b.verify("alice", "new-password-1") is not None
    assert await b.verify("bob", "bobs-password") is not None


async def test_without_the_counter_the_other_worker_waits_for_its_check(tmp_path: Path) -> None:
    """What the counter is for: the same change, unseen by a worker that checks the file once an hour."""
    path = _file(tmp_path)
    a = PasswdFileAuthenticator(path, min_check_interval=3600)
    b = PasswdFileAuthenticator(path, min_check_interval=3600)
    assert await a.set_secret("alice", schemes.hash_password("PLAIN", "new-password-1"))
    assert await b.verify("alice", "old-password") is not None


def test_the_counter_is_shared_with_forked_workers() -> None:
    gen = Generation(shared=True)
    before = gen.current()
    pid = os.fork()
    if pid == 0:
        gen.bump()
        os._exit(0)
    os.waitpid(pid, 0)
    assert gen.current() == before + 1
    private = Generation()
    pid = os.fork()
    if pid == 0:
        private.bump()
        os._exit(0)
    os.waitpid(pid, 0)
    assert private.current() == 0
