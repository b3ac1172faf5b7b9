"""Configuration layering: defaults < TOML file < TIDINGS_* environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from tidings import Config, ConfigError, OverflowPolicy
from tidings.cli import main


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
    assert "write_timeout = 3.0" in out


def test_serve_with_a_bad_flag_exits_2_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--outbox-size", "-4"]) == 2
    assert "outbox_size must be at least 1" in capsys.readouterr().err


def test_direct_construction_converts_and_validates_like_the_loader() -> None:
    config = Config(overflow_policy="disconnect", write_timeout="500ms", max_message_size="1MiB")  # type: ignore[arg-type]
    assert config.overflow_policy is OverflowPolicy.DISCONNECT
    assert (config.write_timeout, config.max_message_size) == (0.5, 1024 * 1024)
    with pytest.raises(ConfigError, match="transport must be one of builtin, hypercorn"):
        Config(transport="nginx")  # type: ignore[arg-type]
