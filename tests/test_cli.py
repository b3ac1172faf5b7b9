"""The ``tidings`` command as a user runs it: the real console script, real processes,
real signals. Every error a user can cause is one line on stderr, without a
traceback, with exit status 1 (2 for usage and configuration errors)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import jwt
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from tidings import Config
from tidings.cli import _parser

from .conftest import TEST_TIMEOUT, receive, running_server, subscribe

pytestmark = pytest.mark.slow

#: The console script pip installed next to this interpreter, as a user runs it.
SCRIPT = shutil.which("tidings", path=str(Path(sys.executable).parent))
TIDINGS = [SCRIPT] if SCRIPT else [sys.executable, "-m", "tidings"]
SECRET = "a-jwt-secret-of-32-bytes-or-more!"


def environment(**variables: str) -> dict[str, str]:
    """This process's environment without TIDINGS_* settings, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    return env | variables


class Lines:
    """Reads a child process's output line by line."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self) -> str:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(self.buffer.decode(errors="replace"))
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    async def until(self, text: str) -> str:
        while True:
            line = await self.next()
            if text in line:
                return line


@asynccontextmanager
async def tidings_serve(
    *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[trio.Process, str]]:
    """``tidings serve`` on a free port; yields the process and its WebSocket URL."""
    process = await trio.lowlevel.open_process(
        [*TIDINGS, "serve", "--port", "0", "--log-level", "warning", *args],
        stdout=subprocess.PIPE,
        env=env or environment(),
    )
    try:
        assert process.stdout is not None
        line = await Lines(process.stdout).until("listening on ")
        yield process, line.split("listening on ", 1)[1].strip()
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [*TIDINGS, *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env or environment(),
    )


async def next_millisecond() -> None:
    """Into the next millisecond: event timestamps count in them (a clock, not a sync)."""
    await trio.sleep(0.0011 - time.time() % 0.001)


def one_line_error(result: subprocess.CompletedProcess[bytes], status: int, *says: str) -> str:
    """Assert the exit status and a one-line, traceback-free stderr; returns the line."""
    err = result.stderr.decode()
    assert result.returncode == status, (result.returncode, err)
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for text in says:
        assert text in err, err
    return err.strip()


# --- serving and shutting down -----------------------------------------------------------


async def test_sigterm_closes_every_client_with_1001_and_exits_0() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with tidings_serve() as (process, url):
            async with open_websocket_url(url) as first, open_websocket_url(url) as second:
                await subscribe(first, "t")
                await subscribe(second, "t")
                process.send_signal(signal.SIGTERM)
                for ws in (first, second):
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.get_message()
                    assert closed.value.reason.code == 1001
            assert await process.wait() == 0


async def test_sigint_also_shuts_down_cleanly() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with tidings_serve() as (process, _url):
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 0


async def test_the_banner_says_what_is_served_and_how() -> None:
    env = environment(TIDINGS_API_KEY="an-api-key-long-enough", TIDINGS_OUTBOX_SIZ="5")
    with trio.fail_after(TEST_TIMEOUT):
        process = await trio.lowlevel.open_process(
            [*TIDINGS, "serve", "--port", "0", "--token", "a-static-token-0123"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            assert process.stderr is not None
            out, err = Lines(process.stdout), Lines(process.stderr)
            first = await out.next()
            assert first.startswith("tidings ") and " listening on ws://127.0.0.1:" in first
            banner = [await out.next() for _ in range(5)]
            text = "\n".join(banner)
            assert "/ws (native)" in text and "/connection/websocket (centrifugo)" in text
            assert "/health, /metrics, /api/, /console/ (api on)" in text
            assert "auth       token" in text
            assert "backplane  memory" in text
            # An unknown TIDINGS_* variable is a warning at start, with a suggestion.
            warning = await err.until("TIDINGS_OUTBOX_SIZ")
            assert "did you mean TIDINGS_OUTBOX_SIZE?" in warning
        finally:
            process.kill()
            await process.wait()


async def test_serve_demo_publishes_norn_shaped_events() -> None:
    norn_types = {
        "deploy.step", "deploy.progress", "deploy.completed", "deploy.failed",
        "app.restarted", "app.scaled", "function.completed",
    }  # fmt: skip
    with trio.fail_after(TEST_TIMEOUT):
        async with tidings_serve("--demo") as (_process, url), open_websocket_url(url) as ws:
            await subscribe(ws, "deploys")
            event = await receive(ws)
            envelope = event["payload"]
            assert envelope["type"] in norn_types
            assert isinstance(envelope["appId"], str)
            assert {"sagaId", "step", "status"} <= envelope["payload"].keys()
            answer = await run("request", "apps", "--url", url)
            assert b'"apps"' in answer.stdout


async def test_python_dash_m_tidings_is_the_same_command() -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "tidings", "--version"], capture_stdout=True, check=False
    )
    assert result.returncode == 0
    assert result.stdout.decode().startswith("tidings ")


# --- errors a user can cause -------------------------------------------------------------


MISTAKES = [
        (["serve", "--outbox-sise", "5"], {}, 2,
         "unknown option --outbox-sise (did you mean --outbox-size?)"),
        (["serve", "--po", "9"], {}, 2, "unknown option --po (did you mean --port?)"),
        (["serve", "--transport", "uvicorn"], {}, 2, "invalid choice: 'uvicorn'"),
        (["serve"], {"TIDINGS_PORT": "abc"}, 2, "TIDINGS_PORT: 'abc' is not an integer"),
        (["serve", "--namespaces", '{"chat": {"presense": true}}'], {}, 2,
         "namespaces.chat: unknown key 'presense' (did you mean 'presence'?)"),
        (["serve", "--host", "0.0.0.0"], {}, 2, "needs client authentication"),
        (["serve"], {"TIDINGS_API_KEY": "None"}, 2, "api_key = 'None' is a placeholder"),
        (["serve", "--host", "192.0.2.1", "--auth", "none"], {}, 1,
         "cannot listen on 192.0.2.1:8800: 192.0.2.1 is not an address of this machine"),
        (["serve", "--host", "no-such-host.invalid", "--auth", "none"], {}, 1,
         "cannot resolve 'no-such-host.invalid'"),
        (["publish", "t", "{not json"], {}, 2, "the payload is not valid JSON"),
        (["publish", "t", "1", "--url", "http://127.0.0.1:8800/ws"], {}, 2,
         "not a WebSocket URL; it reads ws://HOST:PORT/PATH (did you mean ws://127.0.0.1:8800/ws?)"),
        (["publish", "t", "1", "--url", "ws://127.0.0.1:9/ws"], {}, 1,
         "cannot connect to ws://127.0.0.1:9/ws"),
        (["watch", "t", "--since", "-1"], {}, 2, "'-1' is not a seq"),
        (["token"], {}, 2, "no jwt_secret to sign with"),
        (["config", "check"], {"TIDINGS_DEMO": "maybe"}, 2,
         "TIDINGS_DEMO: 'maybe' is not a boolean"),
        (["nosuch"], {}, 2, "invalid choice: 'nosuch'"),
]  # fmt: skip


async def test_a_mistake_is_one_line_on_stderr_and_an_exit_status() -> None:
    results: dict[int, subprocess.CompletedProcess[bytes]] = {}

    limit = trio.CapacityLimiter(4)

    async def attempt(index: int, args: list[str], env: dict[str, str]) -> None:
        async with limit:
            results[index] = await run(*args, env=environment(**env))

    with trio.fail_after(3 * TEST_TIMEOUT):  # sixteen Pythons start, four at a time
        async with trio.open_nursery() as nursery:
            for index, (args, env, _, _) in enumerate(MISTAKES):
                nursery.start_soon(attempt, index, args, env)
    for index, (args, _, status, says) in enumerate(MISTAKES):
        try:
            one_line_error(results[index], status, says)
        except AssertionError as exc:
            raise AssertionError(f"tidings {' '.join(args)}: {exc}") from None


async def test_a_public_key_file_that_is_not_pem_stops_the_node(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("ssh-ed25519 AAAA... not what RS256 needs\n")
    with trio.fail_after(TEST_TIMEOUT):
        result = await run("serve", "--jwt-public-key", str(key))
    one_line_error(result, 2, "configuration error: jwt_public_key", "is not a PEM public key")


async def test_the_debug_flag_and_variable_show_the_traceback() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        flag, variable = (
            await run("serve", "--port", "x", "--debug"),
            await run("serve", "--port", "x", env=environment(TIDINGS_DEBUG="1")),
        )
    for result in (flag, variable):
        assert result.returncode == 2
        assert b"Traceback" in result.stderr
        assert result.stderr.strip().endswith(b"--port: 'x' is not an integer")


async def test_errors_from_a_running_node_are_one_line_each() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with tidings_serve() as (_process, url):
            port = url.split(":")[2].split("/")[0]
            async with trio.open_nursery() as nursery:
                results: dict[str, subprocess.CompletedProcess[bytes]] = {}

                async def keep(name: str, *args: str) -> None:
                    results[name] = await run(*args)

                nursery.start_soon(keep, "request", "request", "nosuch", "--url", url)
                nursery.start_soon(keep, "namespace", "publish", "chat:x", "{}", "--url", url)
                nursery.start_soon(keep, "timeout", "publish", "t", "{}", "--url", url,
                                   "--timeout", "0.0001")  # fmt: skip
                nursery.start_soon(keep, "in use", "serve", "--port", port)
        one_line_error(
            results["request"], 1,
            "request 'nosuch' refused: not_found: no request handler for topic 'nosuch'",
        )  # fmt: skip
        one_line_error(results["namespace"], 1, "publish to 'chat:x' refused: unknown_namespace")
        one_line_error(results["timeout"], 1, "in time")
        one_line_error(
            results["in use"], 1, f"cannot listen on 127.0.0.1:{port}: the address is in use"
        )


# --- publish and watch ---------------------------------------------------------------------


async def test_publish_prints_the_seq_and_epoch_and_watch_prints_events() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with tidings_serve() as (_process, url):
            first = await run(
                "publish", "deploys", '{"type": "deploy.step", "appId": "api"}', "--url", url
            )
            assert first.returncode == 0, first.stderr
            seq, epoch = first.stdout.decode().split()
            assert seq == "1"
            second = await run("publish", "deploys", '"plain"', "--url", url, "--json")
            assert orjson.loads(second.stdout) == {"topic": "deploys", "seq": 2, "epoch": epoch}

            watch = await trio.lowlevel.open_process(
                [*TIDINGS, "watch", "deploys", "--since", "0", "--url", url],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            try:
                assert watch.stdout is not None
                lines = Lines(watch.stdout)
                replayed = [await lines.next(), await lines.next()]
                assert "deploys #1 deploy.step api" in replayed[0]
                assert 'deploys #2 "plain"' in replayed[1]
                async with open_websocket_url(url) as ws:
                    await ws.send_message(
                        orjson.dumps(
                            {"type": "publish", "topic": "deploys", "payload": {"live": True}}
                        ).decode()
                    )
                    await receive(ws)
                assert 'deploys #3 {"live":true}' in await lines.next()
                watch.send_signal(signal.SIGINT)
                assert await watch.wait() == 0
            finally:
                if watch.returncode is None:
                    watch.kill()
                await watch.wait()


async def test_watch_says_what_a_trimmed_history_lost_and_where_live_begins() -> None:
    """history_size 2, five events per topic: resuming from 1 loses #2-#3 of each."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(history_size=2) as server:
            for n in range(1, 6):  # interleaved, so that time order differs from topic order
                for topic in ("a", "b"):
                    await next_millisecond()  # timestamps are in milliseconds: make them differ
                    await server.publish(topic, {"n": n})
            watch = await trio.lowlevel.open_process(
                [*TIDINGS, "watch", "a", "b", "--since", "1", "--url", server.url, "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment(),
            )  # fmt: skip
            try:
                assert watch.stdout is not None
                assert watch.stderr is not None
                out, err = Lines(watch.stdout), Lines(watch.stderr)
                notes = [await err.until("not recovered"), await err.until("not recovered")]
                assert sorted(note.split(":")[0] for note in notes) == ["! a", "! b"]
                for note in notes:
                    assert (
                        "history no longer reaches back to #2: #2-#3 lost; carrying on from #4"
                        in note
                    )
                assert "4 events replayed from history; live from here" in await err.next()
                replayed = [orjson.loads(await out.next()) for _ in range(4)]
                assert [(e["topic"], e["seq"]) for e in replayed] == [
                    ("a", 4), ("b", 4), ("a", 5), ("b", 5)
                ]  # fmt: skip
                await server.publish("b", "live")
                live = orjson.loads(await out.next())
                assert (live["topic"], live["seq"], live["payload"]) == ("b", 6, "live")
                watch.send_signal(signal.SIGTERM)
                assert await watch.wait() == 0
            finally:
                if watch.returncode is None:
                    watch.kill()
                await watch.wait()


async def test_watch_from_beyond_the_topic_says_so_and_carries_on() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            position = await server.publish("a", 1)
            watch = await trio.lowlevel.open_process(
                [*TIDINGS, "watch", "a", "--since", "99", "--epoch", position.epoch,
                 "--url", server.url],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment(),
            )  # fmt: skip
            try:
                assert watch.stdout is not None
                assert watch.stderr is not None
                note = await Lines(watch.stderr).until("not recovered")
                assert "#99 is beyond the topic's last event (#1" in note
                await server.publish("a", "next")
                assert 'a #2 "next"' in await Lines(watch.stdout).next()
            finally:
                watch.kill()
                await watch.wait()


async def test_watch_into_a_closed_pipe_ends_quietly() -> None:
    """``tidings watch t | head -3``: the reader leaves, watch ends with SIGPIPE's status."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            for n in range(3):
                await server.publish("t", n)
            for json in ([], ["--json"]):
                watch = await trio.lowlevel.open_process(
                    [*TIDINGS, "watch", "t", "--since", "0", "--url", server.url, *json],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment(),
                )  # fmt: skip
                try:
                    assert watch.stdout is not None
                    assert watch.stderr is not None
                    lines = Lines(watch.stdout)
                    for _ in range(3):
                        await lines.next()
                    await watch.stdout.aclose()  # as head does after three lines
                    await server.publish("t", "one more")  # the write that finds no reader
                    errors = b""
                    while chunk := await watch.stderr.receive_some(65536):
                        errors += chunk
                    assert await watch.wait() == 128 + signal.SIGPIPE
                    assert b"Traceback" not in errors
                    assert b"rror" not in errors, errors
                finally:
                    if watch.returncode is None:
                        watch.kill()
                    await watch.wait()


# --- authentication and tokens -------------------------------------------------------------


async def test_a_minted_token_is_accepted_by_a_running_node_and_checked() -> None:
    env = environment(TIDINGS_JWT_SECRET=SECRET)
    with trio.fail_after(TEST_TIMEOUT):
        async with tidings_serve(env=env) as (_process, url):
            minted = await run("token", "--user", "alice", "--publish", "orders,chat:*", env=env)
            assert minted.returncode == 0, minted.stderr
            token = minted.stdout.decode().strip()

            published = await run("publish", "orders", "{}", "--url", url, "--token", token)
            assert published.returncode == 0, published.stderr
            assert published.stdout.decode().split()[0] == "1"
            refused = await run("publish", "other", "{}", "--url", url, "--token", token)
            one_line_error(refused, 1, "publish to 'other' refused: forbidden")

            checked = await run("token", "check", token, env=env)
            assert checked.returncode == 0
            assert b"accepted: user 'alice'" in checked.stdout
            assert b"publish: orders, chat:*" in checked.stdout
            other = environment(TIDINGS_JWT_SECRET="another-secret-of-32-bytes-or-more")
            one_line_error(
                await run("token", "check", token, env=other),
                1, "the node would refuse this token: token signature does not verify",
            )  # fmt: skip
            past = jwt.encode({"sub": "bob", "exp": int(time.time()) - 10}, SECRET)
            one_line_error(await run("token", "check", past, env=env), 1, "token expired")


async def test_watch_and_publish_give_up_on_a_refused_token_with_the_servers_reason() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with tidings_serve(env=environment(TIDINGS_JWT_SECRET=SECRET)) as (_process, url):
            watch = await run("watch", "t", "--url", url)  # exits: a retry would change nothing
            one_line_error(
                watch, 1, "rejected with HTTP 401 unauthorized: a token is required",
                "'tidings token' mints one",
            )  # fmt: skip
            publish = await run("publish", "t", "1", "--url", url, "--token", "not.a.jwt")
            one_line_error(publish, 1, "HTTP 401 unauthorized: invalid token")


# --- configuration ------------------------------------------------------------------------


async def test_config_init_loads_back_unchanged_and_checks_clean(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        init = await run("config", "init")
        assert init.returncode == 0
        path = tmp_path / "tidings.toml"
        path.write_bytes(init.stdout)
        assert Config.load(path, env={}) == Config()
        checked = await run("config", "check", "--config", str(path))
        assert checked.returncode == 0, checked.stderr
        assert checked.stderr == b""
        assert b"configuration OK" in checked.stdout


async def test_config_show_redacts_secrets_and_check_reports_each_problem(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        secret = "s3cret-api-key-s3cret"
        shown = await run("config", "show", env=environment(TIDINGS_API_KEY=secret))
        assert shown.returncode == 0
        assert secret.encode() not in shown.stdout
        assert b'api_key = "***"' in shown.stdout
        assert b"None" not in shown.stdout
        alias = await run("config", env=environment(TIDINGS_API_KEY=secret))
        assert alias.stdout.split(b"\n")[1:] == shown.stdout.split(b"\n")[1:]

        weak = await run("config", "check", env=environment(TIDINGS_JWT_SECRET="..."))
        assert weak.returncode == 0
        assert b"warning: jwt_secret is 3 bytes" in weak.stderr

        path = tmp_path / "t.toml"
        path.write_text('outbox_sise = 3\nping_interval = "soon"\n')
        bad = await run(
            "config", "check", "--config", str(path), "--port", "x",
            env=environment(TIDINGS_OUTBOX_SIZ="5"),
        )  # fmt: skip
        assert bad.returncode == 2
        errors = bad.stderr.decode().splitlines()
        assert len(errors) == 4, errors
        assert all(line.startswith("error: ") for line in errors)
        assert any("did you mean 'outbox_size'" in line for line in errors)
        assert any("did you mean TIDINGS_OUTBOX_SIZE" in line for line in errors)
        assert b"Traceback" not in bad.stderr


async def test_help_is_written_for_people() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        serve = (await run("serve", "--help")).stdout.decode()
    for text in ("/ws", "/connection/websocket", "/api/", "/metrics", "/health",
                 "(default: 512KiB)", "(default: 30s)", "(default: unset)"):  # fmt: skip
        assert text in serve, text
    for text in ("Factory", "None)", "524288", "30.0"):
        assert text not in serve, text


def test_every_option_has_a_line_of_help() -> None:
    def parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
        found = [parser]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, (parser.prog, choice.dest)
                for sub in action.choices.values():
                    found += parsers(sub)
        return found

    checked = 0
    for parser in parsers(_parser()):
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, (parser.prog, action.option_strings or action.dest)
                checked += 1
    assert checked > 3 * 60  # serve, config, config show and check carry every setting
