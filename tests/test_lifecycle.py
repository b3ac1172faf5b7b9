"""The close handshake as a state machine, alone: no trio, no sockets."""

from __future__ import annotations

import pytest

from tidings.connection.lifecycle import Lifecycle, State


def test_a_server_close_is_answered_and_closed() -> None:
    life = Lifecycle()
    assert life.open and not life.finished
    assert life.close(1001, "server shutting down", flush=False)
    assert life.state is State.CLOSING and not life.open
    life.close_sent()
    assert life.state is State.CLOSE_SENT and life.awaits_peer
    life.peer_closed(1001)
    assert life.state is State.CLOSED and life.finished
    assert (life.info.code, life.info.reason, life.info.initiated_by) == (
        1001,
        "server shutting down",
        "server",
    )


def test_a_flushing_close_drains_first() -> None:
    life = Lifecycle()
    life.close(1001, "bye", flush=True)
    assert life.state is State.DRAINING
    with pytest.raises(RuntimeError):
        life.close_sent()  # the close frame cannot go out before the queue
    life.drained()
    assert life.state is State.CLOSING
    life.close_sent()
    assert life.state is State.CLOSE_SENT


def test_the_first_close_wins_but_a_harder_one_cuts_the_drain() -> None:
    life = Lifecycle()
    assert life.close(1001, "shutdown", flush=True)
    assert not life.close(1008, "overflow", flush=False)
    assert life.state is State.CLOSING  # no more draining ...
    assert life.close_frame == (1001, "shutdown")  # ... but the first code stands


def test_a_peer_close_is_echoed_and_by_the_client() -> None:
    life = Lifecycle()
    life.peer_closed(4000, "bye")
    assert life.state is State.CLOSING and not life.reading
    assert life.close_frame == (4000, "bye")
    life.close_sent()
    assert life.state is State.CLOSED  # the peer began: no need to wait for it
    assert (life.info.code, life.info.initiated_by) == (4000, "client")


@pytest.mark.parametrize("code", [1005, 1006])
def test_a_peer_close_without_a_code_is_answered_with_1000(code: int) -> None:
    life = Lifecycle()
    life.peer_closed(code)
    assert life.close_frame[0] == 1000


def test_a_peer_close_during_a_drain_drops_the_rest() -> None:
    life = Lifecycle()
    life.close(1001, "shutdown", flush=True)
    life.peer_closed(1000)
    assert life.state is State.CLOSING
    life.close_sent()
    assert life.state is State.CLOSED
    assert life.info.code == 1001  # ours was decided first


def test_no_answer_to_our_close_is_closed_all_the_same() -> None:
    life = Lifecycle()
    life.close(1000, "", flush=False)
    life.close_sent()
    life.close_timed_out()
    assert life.state is State.CLOSED and life.info.code == 1000


def test_nobody_reading_means_nobody_awaits_the_peer() -> None:
    life = Lifecycle()
    life.close(1002, "protocol error", flush=False)
    life.stopped_reading()
    life.close_sent()
    assert not life.awaits_peer


def test_a_connection_lost_while_open_is_1006_by_whoever_saw_it() -> None:
    life = Lifecycle()
    life.lost("connection lost", "client")
    assert life.state is State.LOST and life.finished
    assert (life.info.code, life.info.reason, life.info.initiated_by) == (
        1006,
        "connection lost",
        "client",
    )


def test_a_close_that_could_not_be_delivered_keeps_its_cause() -> None:
    life = Lifecycle()
    life.close(1008, "outbox overflow", flush=False)
    life.lost("write timeout", "server")
    assert life.state is State.LOST
    assert life.info.code == 1008
    assert life.info.reason == "outbox overflow (close frame not delivered: write timeout)"


def test_a_drop_after_our_close_frame_is_a_close() -> None:
    life = Lifecycle()
    life.close(1000, "", flush=False)
    life.close_sent()
    life.lost("connection lost", "client")  # the peer hung up instead of answering
    assert life.state is State.CLOSED and life.info.code == 1000


def test_a_peer_that_closed_then_vanished_is_still_its_close() -> None:
    life = Lifecycle()
    life.peer_closed(1001, "going away")
    life.lost("connection lost", "client")
    assert (life.info.code, life.info.initiated_by) == (1001, "client")


def test_finished_states_do_not_move() -> None:
    life = Lifecycle()
    life.lost("x", "client")
    life.peer_closed(1000)
    life.close(1000, "", flush=False)
    life.close_timed_out()
    assert life.state is State.LOST and life.info.code == 1006


def test_an_open_connection_has_no_close_yet() -> None:
    assert Lifecycle().info.code == 1006
