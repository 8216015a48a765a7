"""Configuration: the example documents every key, env overrides, one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pop3d.config import ConfigError, Settings, load_settings, parse_hostport

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def test_example_loads_and_documents_every_key():
    load_settings(EXAMPLE)
    text = EXAMPLE.read_text()
    documented: set[str] = set()
    section = ""
    for line in text.splitlines():
        if m := re.match(r"^\[(\w+)\]", line):
            section = m[1]
        elif m := re.match(r"^#?\s*(\w+)\s*=", line):
            documented.add(f"{section}.{m[1]}")
    for name, field in Settings.model_fields.items():
        for key in field.annotation.model_fields:  # type: ignore[union-attr]
            assert f"{name}.{key}" in documented, f"{name}.{key} missing from config.example.toml"


def test_env_overrides_file(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nlisten = ["127.0.0.1:1"]\n[session]\nlogin_delay = 5\n')
    monkeypatch.setenv("POP3D_SESSION__LOGIN_DELAY", "60")
    monkeypatch.setenv("POP3D_SERVER__LISTEN", '["[::1]:2", ":3"]')
    s = load_settings(cfg)
    assert s.session.login_delay == 60
    assert s.server.listen == ["[::1]:2", ":3"]


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_settings("/nonexistent/pop3d.toml")


def test_hostport():
    assert parse_hostport("[::1]:110") == ("::1", 110)
    assert parse_hostport(":110") == ("", 110)
    assert parse_hostport("mail.example.org:995") == ("mail.example.org", 995)
    for bad in ["110", "host:", "host:99999", "::1:110"]:
        with pytest.raises(ValueError):
            parse_hostport(bad)


def test_expire_normalised():
    s = load_settings(None, session={"expire": "never"})
    assert s.session.expire == "NEVER"
    with pytest.raises(ConfigError, match=r"session\.expire"):
        load_settings(None, session={"expire": "soon"})
