"""Configuration: the example documents every key, env overrides, one-line errors."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from pop3d.config import NON_KEY_VARIABLES, ConfigError, Settings, load_settings, parse_hostport

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


# -- POP3D_* environment variables: one line naming the variable, typos refused -----------------------------


def _env_error(environ: dict[str, str], path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=environ)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "var, expect",
    [
        (
            "POP3D_SESION__TIMEOUT",
            "POP3D_SESION__TIMEOUT: unknown section 'sesion' (did you mean POP3D_SESSION__TIMEOUT?)",
        ),
        (
            "POP3D_SESSION__TIMEOT",
            "POP3D_SESSION__TIMEOT: unknown key session.timeot (did you mean POP3D_SESSION__TIMEOUT?)",
        ),
        ("POP3D_NOTHING__TIMEOUT", "POP3D_NOTHING__TIMEOUT: unknown section 'nothing' (sections: server, session,"),
        ("POP3D_SERVER", "POP3D_SERVER: not a configuration variable (POP3D_<SECTION>__<KEY>"),
        ("POP3D_SERVER__LISTEN__0", "POP3D_SERVER__LISTEN__0: not a configuration variable"),
        ("POP3D_LISTEN", "POP3D_LISTEN: not a configuration variable"),
    ],
)
def test_env_typo_is_an_error_naming_the_variable(var, expect):
    assert _env_error({var: "700"}).startswith(expect)


def test_env_wrong_type_echoes_the_value():
    msg = _env_error({"POP3D_SERVER__BACKLOG": "lots"})
    assert msg.startswith("POP3D_SERVER__BACKLOG='lots': server.backlog: Input should be a valid integer")
    msg = _env_error({"POP3D_SESSION__TIMEOUT": "5"})
    assert msg == "POP3D_SESSION__TIMEOUT='5': session.timeout: Input should be greater than or equal to 600"
    msg = _env_error({"POP3D_AUTH__MECHANISMS": '["PLAIN", "FOO"]'})
    assert msg.startswith("""POP3D_AUTH__MECHANISMS='["PLAIN", "FOO"]': auth.mechanisms: unknown mechanism 'FOO'""")
    msg = _env_error({"POP3D_SERVER__LISTEN": "[110]"})
    assert msg == "POP3D_SERVER__LISTEN='[110]': server.listen[0]: Input should be a valid string"


def test_env_list_must_be_json():
    msg = _env_error({"POP3D_SERVER__LISTEN": "0.0.0.0:110"})
    assert msg == (
        "POP3D_SERVER__LISTEN='0.0.0.0:110': server.listen takes a JSON list, "
        """e.g. POP3D_SERVER__LISTEN='["0.0.0.0:110"]'"""
    )


def test_env_problems_are_counted():
    msg = _env_error({"POP3D_A__B": "1", "POP3D_C__D": "2", "POP3D_SERVER__BACKLOG": "x"})
    assert msg.startswith("POP3D_A__B: unknown section 'a'") and msg.endswith("(and 1 more problem)")


def test_env_variables_that_are_not_keys():
    # read by the command line, not a key: never an error; anything not POP3D_* is not ours
    s = load_settings(None, environ={"POP3D_CONFIG_FILE": "/x.toml", "POP3_SERVER__LISTEN": "junk", "HOME": "/"})
    assert s.server.listen == ["0.0.0.0:110"]


def test_every_pop3d_variable_the_code_reads_is_known():
    """A POP3D_* name in the code is either a configuration key or listed in NON_KEY_VARIABLES."""
    names: set[str] = set()
    for py in (Path(__file__).resolve().parent.parent / "pop3d").rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):  # string literals: environ[...] / environ.get(...)
            value = node.value if isinstance(node, ast.Constant) else None
            if isinstance(value, str) and re.fullmatch(r"POP3D_[A-Z0-9_]*[A-Z0-9]", value):
                names.add(value)
    assert names, "no POP3D_* name found"
    for name in sorted(names):
        if "__" in name:
            load_settings(None, environ={name: "[]" if name.endswith("LISTEN") else "1"})  # no "unknown" error
        else:
            assert name in NON_KEY_VARIABLES, f"{name} is read by the code: add it to NON_KEY_VARIABLES"


def test_env_values_are_parsed_per_type(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[metrics]\nlisten = "127.0.0.1:9110"\n[tls]\nclient_identity = "email"\n')
    s = load_settings(
        cfg,
        environ={
            "POP3D_METRICS__LISTEN": "",  # an empty optional is unset
            "pop3d_server__proxy_protocol": "yes",  # names in any case, as before
            "POP3D_AUTH__SECURE_NETWORKS": "[]",
            "POP3D_SESSION__LOGIN_DELAY": "30",
        },
    )
    assert s.metrics.listen is None
    assert s.server.proxy_protocol is True
    assert s.auth.secure_networks == []
    assert s.session.login_delay == 30
    assert s.tls.client_identity == "email"  # the file still counts for keys no variable sets


def test_env_loses_to_explicit_overrides_and_is_not_blamed_for_them():
    s = load_settings(None, environ={"POP3D_SERVER__BACKLOG": "7"}, server={"backlog": 9})
    assert s.server.backlog == 9
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ={"POP3D_SERVER__BACKLOG": "7"}, server={"backlog": 0})
    assert str(info.value).startswith("server.backlog:")


def test_file_value_of_the_wrong_type_is_echoed(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nbacklog = "lots"\n')
    msg = _env_error({}, cfg)
    assert msg == "server.backlog: Input should be a valid integer, unable to parse string as an integer (got 'lots')"


def test_process_environment_is_the_default(monkeypatch):
    monkeypatch.setenv("POP3D_SESSION__TIMEOT", "700")
    with pytest.raises(ConfigError, match="POP3D_SESSION__TIMEOT: unknown key"):
        load_settings(None)
