"""The router in its own process (`[routing] process = true`, with the delivery workers):
messages are routed and delivered once and in order per key across engine restarts and
router process deaths, application ACKs still come, a reload reaches the router process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from hl7.client import MLLPClient

from tests.conftest import RunningRelais, adt, wait_for
from tests.test_routing import channel_file, read_frames, received_by, send, topics


def hub_in_processes(relais, tmp_path: Path, **routing) -> RunningRelais:
    """The hub on tmp_path/hub (the same store each time it is started), router in its own process."""
    home = tmp_path / "hub"
    return relais(
        store={"url": f"sqlite:///{home / 'relais.db'}", "blob_dir": str(home / "blobs")},
        routing={"enabled": True, "routes_dir": str(tmp_path / "routes"), "process": True, **routing},
    )


def send_burst(port: int, control_ids: list[str], ipp_of) -> None:
    """Send on three connections at once (each message waits for its ACK)."""

    def one(ids: list[str]) -> None:
        with MLLPClient("127.0.0.1", port) as client:
            for control_id in ids:
                message = adt("A08", control_id=control_id, ipp=ipp_of(control_id), ins=None)
                assert b"MSA|AA|" in client.send_message(message)

    threads = [threading.Thread(target=one, args=(control_ids[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def assert_once_in_order(hub: RunningRelais, partner: RunningRelais, everything: list[str], ipp_of) -> None:
    got = [m.get("MSH-10") for m in received_by(partner)]
    assert sorted(got) == sorted(everything)  # none lost, none twice
    # Sent on three connections at once: the order per patient is the order of the hub's log.
    logged = [r.event["metadata"]["control_id"] for r in hub.store.read_log() if r.topic == "relais.MessageReceived"]
    for ipp in {ipp_of(c) for c in everything}:
        assert [c for c in got if ipp_of(c) == ipp] == [c for c in logged if ipp_of(c) == ipp]  # in order
    # The partner has each message before the hub has committed its outcome: wait for that.
    wait_for(lambda: all("Delivered" in topics(hub, c) for c in everything), what="every Delivered committed")
    for control_id in everything:
        assert topics(hub, control_id).count("MessageRouted") == 1
        assert topics(hub, control_id).count("Delivered") == 1
    assert hub.store.verify_chain().ok


def once_in_order_across_a_restart(
    running: RunningRelais, start: Callable[[], RunningRelais], partner: RunningRelais, prefix: str, ipp_of
) -> None:
    """60 messages, the engine stopped (whatever is not delivered yet goes after the restart)
    and started again, 30 more: every one delivered once, in order per patient."""
    first = [f"{prefix}-{n}" for n in range(60)]
    send_burst(running.port, first, ipp_of)  # every one answered AA (asserted there)
    running.stop()
    again = start()
    second = [f"{prefix}-{n}" for n in range(60, 90)]
    send_burst(again.port, second, ipp_of)
    everything = first + second
    wait_for(lambda: len(received_by(partner)) >= len(everything), timeout=30, what="every delivery")
    assert_once_in_order(again, partner, everything, ipp_of)


def test_router_process_routes_once_in_order_across_an_engine_restart(relais, tmp_path: Path) -> None:
    partner = relais()
    channel_file(tmp_path / "routes", partner.port)
    hub = hub_in_processes(relais, tmp_path)
    assert hub.app.router_process is not None and hub.app.router is None
    pid = hub.app.router_process.pid
    assert pid is not None and pid != os.getpid()
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "relais-router"  # as ps and top show it

    def ipp_of(control_id: str) -> str:
        return f"RP{int(control_id.rsplit('-', 1)[1]) % 7:03d}"

    once_in_order_across_a_restart(hub, lambda: hub_in_processes(relais, tmp_path), partner, "RPR", ipp_of)


def test_a_killed_router_process_is_restarted_and_routing_resumes_exactly_once(relais, tmp_path: Path) -> None:
    partner = relais()
    channel_file(tmp_path / "routes", partner.port)
    hub = hub_in_processes(relais, tmp_path)
    process = hub.app.router_process
    assert process is not None
    pid = process.pid
    assert pid is not None

    def ipp_of(control_id: str) -> str:
        return f"KL{int(control_id.rsplit('-', 1)[1]) % 5:03d}"

    everything = [f"KILL-{n}" for n in range(120)]
    sender = threading.Thread(target=send_burst, args=(hub.port, everything, ipp_of))
    sender.start()
    wait_for(lambda: len(received_by(partner)) >= 5, what="routing under way")
    os.kill(pid, signal.SIGKILL)  # in the middle of the burst
    sender.join(60)
    wait_for(lambda: process.restarts >= 1, what="the router process to be restarted")
    assert process.pid not in (None, pid)
    wait_for(lambda: len(received_by(partner)) >= len(everything), timeout=30, what="every delivery")
    assert_once_in_order(hub, partner, everything, ipp_of)
    # And it keeps routing what comes next.
    assert send(hub.port, adt("A01", control_id="KILL-AFTER")) == "AA"
    wait_for(lambda: "Delivered" in topics(hub, "KILL-AFTER"), what="delivery after the restart")
    # The router process keeps the search index too: every message indexed, none twice.
    assert hub.app.indexer is None

    def indexed() -> list[dict]:
        return hub.store.query("SELECT message_id, value, COUNT(*) AS n FROM relais_identifiers GROUP BY 1, 2")

    wait_for(lambda: len({r["message_id"] for r in indexed()}) == len(everything) + 1, what="every message indexed")
    assert {r["n"] for r in indexed()} == {1}
    assert {r["value"] for r in indexed()} >= {ipp_of(c) for c in everything} | {"260058815400233"}


def test_a_hung_router_process_is_killed_restarted_and_routing_resumes(relais, tmp_path: Path) -> None:
    partner = relais()
    channel_file(tmp_path / "routes", partner.port)
    hub = hub_in_processes(relais, tmp_path)
    process = hub.app.router_process
    assert process is not None and process.pid is not None
    process.child.hang_timeout = 2.0  # 60 s by default
    pid = process.pid
    os.kill(pid, signal.SIGSTOP)  # alive, and silent: it routes nothing
    try:
        assert send(hub.port, adt("A01", control_id="HUNG-1")) == "AA"  # the intake does not wait for routing
        wait_for(lambda: process.restarts >= 1, timeout=20, what="the hung router process to be replaced")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert process.pid not in (None, pid)
    with contextlib.suppress(ProcessLookupError):  # killed, not merely left behind
        os.kill(pid, 0)
        raise AssertionError("the hung router process is still there")
    wait_for(lambda: "Delivered" in topics(hub, "HUNG-1"), what="delivery by the new router process")
    assert [m.get("MSH-10") for m in received_by(partner)] == ["HUNG-1"]


def test_application_acks_come_with_the_router_in_its_own_process(relais, tmp_path: Path) -> None:
    partner = relais()
    channel_file(tmp_path / "routes", partner.port)
    hub = hub_in_processes(relais, tmp_path)
    with socket.create_connection(("127.0.0.1", hub.port)) as sock:
        sock.sendall(b"\x0b" + adt("A01", control_id="RPA-1", accept_ack="AL", app_ack="AL").encode() + b"\x1c\r")
        commit, application = read_frames(sock, 2)
        assert (commit.get("MSA-1"), commit.get("MSA-2")) == ("CA", "RPA-1")
        assert (application.get("MSA-1"), application.get("MSA-2")) == ("AA", "RPA-1")
        sock.sendall(b"\x0b" + adt("A28", control_id="RPA-2", accept_ack="AL", app_ack="AL").encode() + b"\x1c\r")
        commit, application = read_frames(sock, 2)
        assert commit.get("MSA-1") == "CA" and application.get("MSA-1") == "AE"
        assert "not routed" in application.get("MSA-3")


def test_reload_reaches_the_router_process(relais, tmp_path: Path) -> None:
    # The router process delivers too: a reload changes its transforms and its destinations.
    partner, moved = relais(), relais()
    routes = tmp_path / "routes"
    channel_file(routes, partner.port)
    hub = hub_in_processes(relais, tmp_path)
    assert send(hub.port, adt("A01", control_id="RPL-0")) == "AA"
    wait_for(lambda: "Delivered" in topics(hub, "RPL-0"), what="delivery")
    channel_file(routes, moved.port, extra='[[transform]]\nset = "MSH-6"\nvalue = "RELOADED"')
    assert hub.loop_call(hub.app.reload_routes()) == ["to-partner"]
    assert send(hub.port, adt("A01", control_id="RPL-1")) == "AA"
    wait_for(lambda: "Delivered" in topics(hub, "RPL-1"), what="delivery")
    assert [m.get("MSH-10") for m in received_by(partner)] == ["RPL-0"]
    assert [(m.get("MSH-10"), m.get("MSH-6")) for m in received_by(moved)] == [("RPL-1", "RELOADED")]


def test_router_process_on_a_postgresql_store(relais, tmp_path: Path, pg_url: str) -> None:
    partner = relais()
    routes = tmp_path / "routes"
    channel_file(routes, partner.port)
    hub = relais(
        store={"url": pg_url, "blob_dir": "blobs"},
        routing={"enabled": True, "routes_dir": str(routes), "process": True},
    )
    for i in range(3):
        assert send(hub.port, adt("A01", control_id=f"RPG-{i}")) == "AA"
    wait_for(lambda: all("Delivered" in topics(hub, f"RPG-{i}") for i in range(3)), what="deliveries")
    assert [m.get("MSH-10") for m in received_by(partner)] == [f"RPG-{i}" for i in range(3)]
    assert hub.store.verify_chain().ok


def test_router_in_the_main_process_still_routes_and_answers(relais, tmp_path: Path) -> None:
    # `process = false`: the router is a task of the engine's own loop, as before.
    partner = relais()
    channel_file(tmp_path / "routes", partner.port)
    hub = hub_in_processes(relais, tmp_path, process=False)
    assert hub.app.router is not None and hub.app.router_process is None
    with socket.create_connection(("127.0.0.1", hub.port)) as sock:
        sock.sendall(b"\x0b" + adt("A01", control_id="RPM-1", accept_ack="AL", app_ack="AL").encode() + b"\x1c\r")
        commit, application = read_frames(sock, 2)
        assert (commit.get("MSA-1"), application.get("MSA-1")) == ("CA", "AA")
    wait_for(lambda: "Delivered" in topics(hub, "RPM-1"), what="delivery")
    assert [m.get("MSH-10") for m in received_by(partner)] == ["RPM-1"]


async def test_a_frame_to_a_process_already_gone_is_dropped_not_raised() -> None:
    """When the engine is killed, its children's next frame goes to a closed connection:
    asyncio's transports drop it, uvloop's raise RuntimeError (which a router logged as an
    error after every SIGKILL of the engine). `send` drops it on either loop."""
    import asyncio

    from engine.wire import send

    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    send(writer, ("alive", 0, None))  # while it is open: written
    writer.close()
    await writer.wait_closed()
    send(writer, ("append", 1, None))  # gone: dropped, no RuntimeError
    server.close()
    await server.wait_closed()
