"""Configuration layering: defaults < TOML file < TIDINGS_* environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from tidings import Config, ConfigError, OverflowPolicy
from tidings.cli import main
from tidings.config import check, format_duration, format_size, parse_duration, parse_size, to_toml


def test_defaults_follow_the_design() -> None:
    config = Config()
    assert config.max_message_size == 512 * 1024
    assert (config.ping_interval, config.read_timeout, config.write_timeout) == (30, 60, 10)
    assert config.outbox_size == 256
    assert config.overflow_policy is OverflowPolicy.DROP
    assert (config.host, config.port, config.ws_path) == ("127.0.0.1", 8800, "/ws")


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    toml = tmp_path / "tidings.toml"
    toml.write_text('port = 9001\noutbox_size = 64\nping_interval = "15s"\ntopics = ["a", "b*"]\n')
    env = {"TIDINGS_OUTBOX_SIZE": "32", "TIDINGS_OVERFLOW_POLICY": "disconnect"}
    config = Config.load(toml, env=env, overrides={"overflow_policy": "drop"})
    assert config.port == 9001  # file
    assert config.ping_interval == 15.0  # file, with a unit
    assert config.topics == ("a", "b*")  # file
    assert config.outbox_size == 32  # environment beats file
    assert config.overflow_policy is OverflowPolicy.DROP  # flag beats environment
    assert config.write_timeout == 10.0  # default


def test_the_file_can_come_from_the_environment(tmp_path: Path) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text("history_size = 5\n")
    assert Config.load(env={"TIDINGS_CONFIG": str(toml)}).history_size == 5


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TIDINGS_MAX_MESSAGE_SIZE": "1MiB"}, ("max_message_size", 1024 * 1024)),
        ({"TIDINGS_WRITE_TIMEOUT": "500ms"}, ("write_timeout", 0.5)),
        ({"TIDINGS_HISTORY_TTL": "2m"}, ("history_ttl", 120.0)),
        ({"TIDINGS_DEMO": "yes"}, ("demo", True)),
        ({"TIDINGS_TOPICS": "deploys, functions"}, ("topics", ("deploys", "functions"))),
        ({"TIDINGS_TRANSPORT": "hypercorn"}, ("transport", "hypercorn")),
    ],
)
def test_environment_values_are_parsed_by_the_type_of_their_key(
    env: dict[str, str], expected: tuple[str, object]
) -> None:
    key, value = expected
    assert getattr(Config.load(env=env), key) == value


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prot": "1"}, "unknown key 'prot'"),
        ({"port": "eighty"}, "port"),
        ({"port": 70000}, "between 0 and 65535"),
        ({"overflow_policy": "sometimes"}, "must be one of drop, disconnect"),
        ({"transport": "nginx"}, "must be one of builtin, hypercorn"),
        ({"ping_interval": "soon"}, "not a duration"),
        ({"read_timeout": "10s"}, "longer than ping_interval"),
        ({"outbox_size": 0}, "outbox_size must be at least 1"),
        ({"demo": "maybe"}, "not a boolean"),
    ],
)
def test_bad_values_are_refused_with_a_message_naming_the_key(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.load(env={}, overrides=overrides)


def test_a_typo_in_the_file_fails_at_startup(tmp_path: Path) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text("outbox_sise = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'outbox_sise'.*did you mean 'outbox_size'"):
        Config.load(toml, env={})


def test_a_file_that_is_not_toml_says_so(tmp_path: Path) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text("port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.load(toml, env={})


def test_config_command_prints_the_effective_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text("port = 9100\n")
    monkeypatch.setenv("TIDINGS_OUTBOX_SIZE", "77")
    assert main(["config", "--config", str(toml), "--write-timeout", "3s"]) == 0
    out = capsys.readouterr().out
    assert "port = 9100" in out
    assert "outbox_size = 77" in out
    assert 'write_timeout = "3s"' in out


def test_serve_with_a_bad_flag_exits_2_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--outbox-size", "-4"]) == 2
    assert "outbox_size must be at least 1" in capsys.readouterr().err


def test_direct_construction_converts_and_validates_like_the_loader() -> None:
    config = Config(overflow_policy="disconnect", write_timeout="500ms", max_message_size="1MiB")  # type: ignore[arg-type]
    assert config.overflow_policy is OverflowPolicy.DISCONNECT
    assert (config.write_timeout, config.max_message_size) == (0.5, 1024 * 1024)
    with pytest.raises(ConfigError, match="transport must be one of builtin, hypercorn"):
        Config(transport="nginx")  # type: ignore[arg-type]


# --- show, init, check ---------------------------------------------------------------


def test_the_defaults_as_toml_load_back_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "init.toml"
    path.write_text(to_toml(Config(), redact=False))
    assert Config.load(path, env={}) == Config()
    assert "None" not in path.read_text()


def test_a_configuration_as_toml_loads_back_unchanged(tmp_path: Path) -> None:
    config = Config(
        port=9100,
        write_timeout="250ms",
        history_ttl="1h",
        max_message_size="1MiB",
        outbox_size=3,
        topics=("deploys", "app.*"),
        client_publish=False,
        allowed_origins=("https://app.example.com",),
        namespaces={"chat": {"presence": True, "history_ttl": "90s", "topics": ["chat:x"],
                             "history_max_bytes": "1MiB"},
                    "dotted.name": {"local": True}},
        jwt_audience="tidings",
    )  # fmt: skip
    path = tmp_path / "show.toml"
    path.write_text(to_toml(config, redact=False))
    assert Config.load(path, env={}) == config
    text = path.read_text()
    assert 'max_message_size = "1MiB"' in text
    assert 'write_timeout = "250ms"' in text
    assert 'history_max_bytes = "1MiB"' in text  # the namespace's, written as the docs do


def test_show_redacts_secrets_and_the_redaction_cannot_become_a_secret(tmp_path: Path) -> None:
    config = Config(token="t0ps3cret-t0ps3cret", api_key="k3y-k3y-k3y-k3y-k3y")
    text = to_toml(config)
    assert "t0ps3cret" not in text
    assert "k3y-k3y" not in text
    assert 'api_key = "***"' in text
    # Unset keys are commented out, not written as "None".
    assert "# jwt_secret =" in text
    assert "None" not in text
    path = tmp_path / "copy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="placeholder"):
        Config.load(path, env={})


@pytest.mark.parametrize("name", ["token", "jwt_secret", "api_key", "jwt_audience"])
@pytest.mark.parametrize("value", ["None", "***", "null"])
def test_placeholders_are_refused_as_values(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{name} = '.*' is a placeholder"):
        Config.load(env={f"TIDINGS_{name.upper()}": value})


def test_an_environment_error_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"TIDINGS_PORT: 'abc' is not an integer"):
        Config.load(env={"TIDINGS_PORT": "abc"})
    with pytest.raises(ConfigError, match=r"TIDINGS_DEMO: 'maybe' is not a boolean"):
        Config.load(env={"TIDINGS_DEMO": "maybe"})
    with pytest.raises(ConfigError, match=r"between 0 and 65535, not 70000 \(from TIDINGS_PORT\)"):
        Config.load(env={"TIDINGS_PORT": "70000"})
    with pytest.raises(ConfigError, match=r"--port: 'abc' is not an integer"):
        Config.load(env={}, overrides={"port": "abc"})


def test_an_unknown_key_in_a_namespace_table_gets_a_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text("[namespaces.chat]\npresense = true\n")
    with pytest.raises(
        ConfigError, match=r"namespaces.chat: unknown key 'presense' \(did you mean 'presence'\?\)"
    ):
        Config.load(path, env={})
    with pytest.raises(ConfigError, match="did you mean 'presence'"):
        Config(namespaces={"chat": {"presense": True}})


def test_check_reports_every_problem_of_every_layer(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text("outbox_sise = 3\nhistory_size = -1\n")
    env = {"TIDINGS_PORT": "abc", "TIDINGS_OUTBOX_SIZ": "5", "TIDINGS_CLIENT_TOKEN": "mine"}
    report = check(path, env=env, overrides={"write_timeout": "soon"})
    assert report.config is None
    assert len(report.errors) == 4, report.errors
    errors = "\n".join(report.errors)
    assert "unknown key 'outbox_sise'" in errors
    assert "TIDINGS_PORT: 'abc' is not an integer" in errors
    assert "--write-timeout: 'soon' is not a duration" in errors
    assert "TIDINGS_OUTBOX_SIZ (did you mean TIDINGS_OUTBOX_SIZE?)" in errors
    # Only at start: an unknown variable does not stop Config.load.
    assert Config.load(env={"TIDINGS_OUTBOX_SIZ": "5"}).outbox_size == 256


def test_check_warns_of_weak_secrets_but_accepts_them() -> None:
    report = check(env={"TIDINGS_JWT_SECRET": "...", "TIDINGS_API_KEY": "k"})
    assert report.config is not None
    assert report.errors == ()
    assert any("jwt_secret is 3 bytes" in warning for warning in report.warnings)
    assert any("api_key is 1 characters" in warning for warning in report.warnings)
    strong = check(env={"TIDINGS_JWT_SECRET": "x" * 32})
    assert strong.warnings == ()


@pytest.mark.parametrize(
    ("seconds", "text"), [(30.0, "30s"), (0.5, "500ms"), (300.0, "300s"), (3600.0, "1h"),
                          (1.5, "1.5s"), (0.001, "1ms")]
)  # fmt: skip
def test_durations_are_written_as_the_docs_write_them(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("size", "text"), [(512 * 1024, "512KiB"), (1024**2, "1MiB"), (1000, "1000"), (1, "1")]
)
def test_sizes_are_written_as_the_docs_write_them(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == size


# --- the [proxy] table --------------------------------------------------------------------


def test_the_proxy_table_the_environment_and_flags_set_the_same_keys(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        '[proxy]\nconnect = "http://app:8000/hooks/connect"\ntimeout = "2s"\n'
        'forward_headers = ["Cookie"]\n'
    )
    env = {
        "TIDINGS_PROXY_SUBSCRIBE": "http://app:8000/hooks/subscribe",
        "TIDINGS_PROXY_TIMEOUT": "3s",
    }
    config = Config.load(path, env=env, overrides={"proxy_cache_ttl": "30s"})
    assert config.proxy_connect == "http://app:8000/hooks/connect"  # file
    assert config.proxy_subscribe == "http://app:8000/hooks/subscribe"  # environment
    assert config.proxy_timeout == 3.0  # environment beats file
    assert config.proxy_forward_headers == ("Cookie",)
    assert config.proxy_cache_ttl == 30.0  # flag
    assert Config().proxy_forward_headers == (
        "Cookie", "Authorization", "Origin", "User-Agent", "X-Forwarded-For",
    )  # fmt: skip
    report = check(path, env={}, overrides={"proxy_rpc": "http://x/rpc"})
    assert report.errors == ()
    assert report.config is not None and report.config.proxy_rpc == "http://x/rpc"


def test_a_configuration_with_hooks_as_toml_loads_back_unchanged(tmp_path: Path) -> None:
    config = Config(
        proxy_connect="http://user:pass@app:8000/connect",
        proxy_rpc="https://app/rpc",
        proxy_timeout="250ms",
        proxy_forward_headers=("Cookie", "X-Request-Id"),
        proxy_cache_ttl="1m",
        proxy_max_response_size="64KiB",
        proxy_unavailable="allow",
        namespaces={"chat": {"presence": True}},
    )
    path = tmp_path / "show.toml"
    path.write_text(to_toml(config, redact=False))
    assert Config.load(path, env={}) == config
    text = to_toml(config)
    assert "[proxy]" in text
    assert 'connect = "http://user:***@app:8000/connect"' in text  # the password is a secret
    assert "pass@" not in text
    path.write_text(text)
    with pytest.raises(
        ConfigError, match="proxy_connect: the password '\\*\\*\\*' is a placeholder"
    ):
        Config.load(path, env={})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"proxy_connect": "ftp://app/connect"},
            "proxy_connect must be an http:// or https:// URL",
        ),
        ({"proxy_rpc": "app:8000/rpc"}, "proxy_rpc must be an http:// or https:// URL"),
        ({"proxy_subscribe": "http://app:port/x"}, "proxy_subscribe must be an http"),
        ({"proxy_timeout": "0s"}, "proxy_timeout must be greater than 0"),
        ({"proxy_max_in_flight": 0}, "proxy_max_in_flight must be at least 1"),
        ({"proxy_cache_ttl": -1}, "proxy_cache_ttl must not be negative"),
        ({"proxy_unavailable": "maybe"}, "proxy_unavailable must be one of refuse, allow"),
        ({"proxy_forward_headers": ("Content-Length",)}, "describes the hook call itself"),
        ({"proxy_forward_headers": ("Cookie", "cookie")}, "cookie is listed twice"),
        ({"proxy_forward_headers": ("Bad Header",)}, "is not a header name"),
    ],
)
def test_bad_proxy_settings_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(**settings)  # type: ignore[arg-type]


def test_an_unknown_key_of_the_proxy_table_gets_a_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[proxy]\nconect = "http://app/connect"\n')
    with pytest.raises(
        ConfigError, match=r"unknown key 'conect' in \[proxy\] \(did you mean 'connect'\?\)"
    ):
        Config.load(path, env={})
    report = check(env={"TIDINGS_PROXY_CONECT": "http://app/connect"})
    assert "TIDINGS_PROXY_CONECT (did you mean TIDINGS_PROXY_CONNECT?)" in "\n".join(report.errors)


def test_a_connect_hook_is_client_authentication_on_a_public_address() -> None:
    with pytest.raises(ConfigError, match="needs client authentication"):
        Config(host="0.0.0.0")
    config = Config(host="0.0.0.0", proxy_connect="http://app/connect")
    assert config.auth_mode == "none"  # the hook decides who connects
    report = check(env={"TIDINGS_HOST": "0.0.0.0", "TIDINGS_PROXY_CONNECT": "http://app/c"})
    assert report.errors == () and report.warnings == ()
