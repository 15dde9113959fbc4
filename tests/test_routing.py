"""Routing end to end: a message in over MLLP, routed by a channel file, delivered to a real
partner (a second Relais listening on MLLP), with retries, order, dead letters and reload."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from hl7.client import MLLPClient

from engine.er7 import Er7Message
from tests.conftest import RunningRelais, adt, wait_for

RELAIS = str(Path(sys.executable).parent / "relais")


def channel_file(
    folder: Path, port: int, *, name: str = "to-partner", extra: str = "", dest: str = "", attempts: int = 4
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(
        f"""
name = "{name}"
[filter]
all = [{{ message_type = ["ADT^A0*"] }}, {{ sender = "SIH_CHU|*" }}]
[tables.finess]
CHU_EXEMPLE = "750712184"
[[transform]]
map = "MSH-4"
table = "finess"
[[transform]]
set = "MSH-5"
value = "PARTNER"
{extra}
[[destination]]
name = "partner"
type = "mllp"
max_attempts = {attempts}
backoff_initial = 0.05
backoff_max = 0.2
{dest}
[destination.settings]
host = "127.0.0.1"
port = {port}
ack_timeout = 2.0
connect_timeout = 1.0
"""
    )
    return path


def send(port: int, message: str) -> str:
    with MLLPClient("127.0.0.1", port) as client:
        return Er7Message.parse(client.send_message(message).strip(b"\x0b\x1c\r").decode()).get("MSA-1")


def topics(running: RunningRelais, control_id: str) -> list[str]:
    rows = running.store.query("SELECT message_id FROM relais_messages WHERE control_id = ?", [control_id])
    if not rows:
        return []
    return [e.topic.removeprefix("relais.") for e in running.store.events_of(uuid.UUID(rows[0]["message_id"]))]


def received_by(partner: RunningRelais) -> list[Er7Message]:
    rows = partner.store.query("SELECT payload_sha256 FROM relais_messages ORDER BY received_at")
    return [Er7Message.parse(partner.store.payload(r["payload_sha256"]).decode()) for r in rows]


def routed_relais(relais, tmp_path: Path, partner_port: int, **kw) -> RunningRelais:
    routes = tmp_path / "routes"
    channel_file(routes, partner_port, **kw)
    return relais(routing={"enabled": True, "routes_dir": str(routes)})


def restarted_hub(relais, tmp_path: Path) -> RunningRelais:
    """The hub (second instance of the test) started again on its store and routes."""
    home = tmp_path / "relais1"
    return relais(
        store={"url": f"sqlite:///{home / 'relais.db'}", "blob_dir": str(home / "blobs")},
        routing={"enabled": True, "routes_dir": str(tmp_path / "routes")},
    )


def test_message_is_routed_transformed_and_delivered_to_the_partner(relais, tmp_path: Path) -> None:
    partner = relais()
    hub = routed_relais(relais, tmp_path, partner.port)
    message = adt("A01", control_id="ROUTE-1")
    assert send(hub.port, message) == "AA"
    wait_for(lambda: "Delivered" in topics(hub, "ROUTE-1"), what="delivery")
    assert topics(hub, "ROUTE-1") == ["MessageReceived", "MessageRouted", "DeliveryAttempted", "Delivered"]
    [got] = received_by(partner)
    assert got.get("MSH-10") == "ROUTE-1"
    assert got.get("MSH-4") == "750712184" and got.get("MSH-5") == "PARTNER"
    assert got.segments[2:] == Er7Message.parse(message).segments[2:]  # the rest untouched


def test_message_no_channel_takes_is_recorded_not_routed_with_the_reason(relais, tmp_path: Path) -> None:
    partner = relais()
    hub = routed_relais(relais, tmp_path, partner.port)
    assert send(hub.port, adt("A28", control_id="NOROUTE-1")) == "AA"
    wait_for(lambda: "NotRouted" in topics(hub, "NOROUTE-1"), what="NotRouted")
    rows = hub.store.query("SELECT message_id FROM relais_messages WHERE control_id = 'NOROUTE-1'")
    event = hub.store.events_of(uuid.UUID(rows[0]["message_id"]))[1].event
    assert "ADT^A28" in event["misses"]["to-partner"]
    assert received_by(partner) == []


def test_partner_down_retries_then_delivers_in_order_per_patient(relais, tmp_path: Path) -> None:
    partner = relais()
    port = partner.port
    partner.stop()  # the partner is down when the messages arrive
    hub = routed_relais(relais, tmp_path, port, attempts=50)
    ids = [f"ORDER-{i}" for i in range(5)]
    for control_id in ids:
        assert send(hub.port, adt("A01", control_id=control_id)) == "AA"
    wait_for(lambda: "DeliveryFailed" in topics(hub, ids[0]), what="a failed attempt")
    # Only the oldest message of the patient is attempted while the partner is down.
    assert "DeliveryAttempted" not in topics(hub, ids[1])
    partner_again = relais(listeners={"mllp": [{"name": "mllp", "port": port}]})
    wait_for(lambda: all("Delivered" in topics(hub, c) for c in ids), timeout=30, what="all delivered")
    assert [m.get("MSH-10") for m in received_by(partner_again)] == ids
    failed = [e for e in topics(hub, ids[0]) if e == "DeliveryFailed"]
    assert failed  # each failure is an event with its retry time


def test_dead_letter_holds_the_key_until_redelivered(relais, tmp_path: Path) -> None:
    partner = relais()
    port = partner.port
    partner.stop()
    hub = routed_relais(relais, tmp_path, port, dest='on_failure = "block"')
    assert send(hub.port, adt("A01", control_id="DEAD-1")) == "AA"
    wait_for(lambda: "DeadLettered" in topics(hub, "DEAD-1"), what="dead letter")
    assert topics(hub, "DEAD-1").count("DeliveryAttempted") == 4  # max_attempts
    assert send(hub.port, adt("A03", control_id="DEAD-2")) == "AA"  # same patient: held
    wait_for(lambda: "MessageRouted" in topics(hub, "DEAD-2"), what="routing")
    time.sleep(0.5)
    assert "DeliveryAttempted" not in topics(hub, "DEAD-2")
    config = tmp_path / "relais1" / "config.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path / "relais1" / "relais.db"}"\nblob_dir = "blobs"\n')
    listed = subprocess.run([RELAIS, "--config", str(config), "deadletters", "list", "--json"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    [dead] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert dead["channel"] == "to-partner" and dead["blocks"] == 1
    partner_again = relais(listeners={"mllp": [{"name": "mllp", "port": port}]})
    asked = subprocess.run([RELAIS, "--config", str(config), "redeliver", dead["message_id"], "--by", "opérateur",
                            "--reason", "partner back"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    wait_for(lambda: "Delivered" in topics(hub, "DEAD-2"), timeout=30, what="held message delivered")
    assert [m.get("MSH-10") for m in received_by(partner_again)] == ["DEAD-1", "DEAD-2"]
    redelivered = [
        e.event for e in hub.store.events_of(uuid.UUID(dead["message_id"])) if e.topic == "relais.Redelivered"
    ]
    assert redelivered and redelivered[0]["requested_by"] == "opérateur"


def test_skip_policy_lets_the_next_messages_go(relais, tmp_path: Path) -> None:
    partner = relais(listeners={"mllp": [{"name": "mllp", "port": 0, "required_fields": ["PV1-19"]}]})
    hub = routed_relais(relais, tmp_path, partner.port, dest='on_failure = "skip"')
    no_visit = adt("A01", control_id="SKIP-1").replace("V20261123001", "")  # partner answers AE
    assert send(hub.port, no_visit) == "AA"
    assert send(hub.port, adt("A01", control_id="SKIP-2")) == "AA"
    wait_for(lambda: "Delivered" in topics(hub, "SKIP-2"), timeout=30, what="next message delivered")
    wait_for(lambda: "DeadLettered" in topics(hub, "SKIP-1"), what="AE dead-lettered")


def test_routing_resumes_after_restart_exactly_once(relais, tmp_path: Path) -> None:
    partner = relais()
    hub = routed_relais(relais, tmp_path, partner.port)
    for i in range(3):
        assert send(hub.port, adt("A01", control_id=f"ONCE-{i}")) == "AA"
    wait_for(lambda: all("Delivered" in topics(hub, f"ONCE-{i}") for i in range(3)), what="delivered")
    hub.stop()
    again = restarted_hub(relais, tmp_path)
    assert send(again.port, adt("A01", control_id="ONCE-3")) == "AA"
    wait_for(lambda: "Delivered" in topics(again, "ONCE-3"), what="delivered after restart")
    for i in range(4):
        assert topics(again, f"ONCE-{i}").count("MessageRouted") == 1
    assert sorted(m.get("MSH-10") for m in received_by(partner)) == [f"ONCE-{i}" for i in range(4)]
    assert again.store.verify_chain().ok


def test_patients_are_searchable_once_each_when_deliveries_come_between_their_messages(relais, tmp_path: Path) -> None:
    """The search index reads past the routing and delivery events that follow a message,
    indexes the next one, and indexes nothing twice across a restart."""

    def indexed(running: RunningRelais, ins: str) -> int:
        return len(running.store.query("SELECT 1 AS x FROM relais_identifiers WHERE value = ?", [ins]))

    partner = relais()
    hub = routed_relais(relais, tmp_path, partner.port)
    patients = [f"1900175123456{i:02d}" for i in range(3)]
    for i, ins in enumerate(patients[:2]):
        assert send(hub.port, adt("A01", control_id=f"SEARCH-{i}", ins=ins)) == "AA"
        wait_for(lambda i=i: "Delivered" in topics(hub, f"SEARCH-{i}"), what="delivery")
        wait_for(lambda ins=ins: indexed(hub, ins), what="the patient in the search index")
    hub.stop()
    again = restarted_hub(relais, tmp_path)
    assert send(again.port, adt("A01", control_id="SEARCH-2", ins=patients[2])) == "AA"
    wait_for(lambda: "Delivered" in topics(again, "SEARCH-2"), what="delivery after restart")
    wait_for(lambda: indexed(again, patients[2]), what="the patient in the search index after restart")
    assert [indexed(again, ins) for ins in patients] == [1, 1, 1]


def test_a_backlog_larger_than_one_outbox_read_is_delivered_once_in_order_per_patient(relais, tmp_path: Path) -> None:
    # More waiting keys than one read of the outbox takes (2 slots: ~70 keys per read), the
    # partner down while they pile up, then the hub restarted halfway through.
    partner = relais()
    port = partner.port
    partner.stop()
    routes = tmp_path / "routes"
    channel_file(routes, port, attempts=1000)
    hub = relais(routing={"enabled": True, "routes_dir": str(routes), "delivery_concurrency": 2})
    patients = [f"BL{p:03d}" for p in range(90)]
    order = {ipp: [f"BL-{ipp}-{n}" for n in range(3)] for ipp in patients}
    with MLLPClient("127.0.0.1", hub.port) as client:
        for n in range(3):
            for ipp in patients:
                ack = client.send_message(adt("A08", control_id=order[ipp][n], ipp=ipp, ins=None))
                assert b"MSA|AA|" in ack
    wait_for(lambda: "DeliveryFailed" in topics(hub, order[patients[0]][0]), what="a failed attempt")
    partner_again = relais(listeners={"mllp": [{"name": "mllp", "port": port}]})
    wait_for(lambda: len(received_by(partner_again)) >= 90, timeout=30, what="some deliveries")
    hub.stop()
    again = restarted_hub(relais, tmp_path)
    everything = [c for ids in order.values() for c in ids]
    wait_for(lambda: len(received_by(partner_again)) == len(everything), timeout=60, what="every delivery")
    got = [m.get("MSH-10") for m in received_by(partner_again)]
    assert sorted(got) == sorted(everything)  # none lost
    for ipp, ids in order.items():
        assert [c for c in got if c.startswith(f"BL-{ipp}-")] == ids  # in order per patient
    resent = partner_again.store.query(
        "SELECT count(*) AS n FROM stored_events WHERE topic = 'relais.DuplicateReceived'"
    )
    assert resent[0]["n"] == 0  # nothing sent twice
    # The partner has each message before the hub has committed its outcome: wait for that.
    wait_for(lambda: all("Delivered" in topics(again, c) for c in everything), what="every Delivered committed")
    for control_id in everything:
        assert topics(again, control_id).count("Delivered") == 1
        assert topics(again, control_id).count("MessageRouted") == 1
    assert again.store.verify_chain().ok


def test_reload_applies_a_new_route_and_refuses_a_bad_one(relais, tmp_path: Path) -> None:
    partner = relais()
    hub = routed_relais(relais, tmp_path, partner.port)
    routes = tmp_path / "routes"
    channel_file(routes, partner.port, extra='[[transform]]\nset = "MSH-6"\nvalue = "RELOADED"')
    names = hub.loop_call(hub.app.reload_routes())
    assert names == ["to-partner"]
    assert send(hub.port, adt("A01", control_id="RELOAD-1")) == "AA"
    wait_for(lambda: "Delivered" in topics(hub, "RELOAD-1"), what="delivery")
    assert received_by(partner)[-1].get("MSH-6") == "RELOADED"
    (routes / "broken.toml").write_text('[[destination]]\nname = "x"\ntype = "carrier-pigeon"\n')
    try:
        hub.loop_call(hub.app.reload_routes())
        raise AssertionError("a bad route file was accepted")
    except Exception as e:
        assert "broken.toml" in str(e)
    assert send(hub.port, adt("A01", control_id="RELOAD-2")) == "AA"  # old routes still work
    wait_for(lambda: "Delivered" in topics(hub, "RELOAD-2"), what="delivery with the old routes")


def test_file_destination_drops_the_transformed_message(relais, tmp_path: Path) -> None:
    routes = tmp_path / "routes"
    routes.mkdir()
    (routes / "drop.toml").write_text(
        f'[[destination]]\nname = "drop"\ntype = "file"\n[destination.settings]\nfolder = "{tmp_path / "out"}"\n'
    )
    hub = relais(routing={"enabled": True, "routes_dir": str(routes)})
    message = adt("A01", control_id="FILE-1")
    assert send(hub.port, message) == "AA"
    wait_for(lambda: "Delivered" in topics(hub, "FILE-1"), what="file delivery")
    [dropped] = list((tmp_path / "out").iterdir())
    assert dropped.read_bytes() == message.encode()


def test_admission_notification_reaches_an_mqtt_subscriber(relais, tmp_path: Path, mqtt_broker: int) -> None:
    import queue

    import paho.mqtt.client as mqtt

    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}")
    subscriber.on_message = lambda _c, _u, msg: got.put((msg.topic, msg.payload))
    subscriber.connect("127.0.0.1", mqtt_broker)
    subscriber.subscribe("relais-test/#", qos=1)
    subscriber.loop_start()
    try:
        routes = tmp_path / "routes"
        routes.mkdir()
        (routes / "gp.toml").write_text(
            '[filter]\nall = [{ message_type = ["ADT^A01"] }, { field = "PID-32", equals = "VALI" }]\n'
            '[[destination]]\nname = "gp"\ntype = "mqtt"\nordering_key = "patient"\n'
            f'[destination.settings]\nhost = "127.0.0.1"\nport = {mqtt_broker}\n'
            'topic = "relais-test/{sending_facility}/{trigger_event}"\nbody = "json"\n'
        )
        hub = relais(routing={"enabled": True, "routes_dir": str(routes)})
        time.sleep(0.3)  # the subscription is in place
        assert send(hub.port, adt("A01", control_id="MQTT-1")) == "AA"
        assert send(hub.port, adt("A01", control_id="MQTT-2", reliability="PROV")) == "AA"
        topic, body = got.get(timeout=15)
        assert topic == "relais-test/CHU_EXEMPLE/A01"
        envelope = json.loads(body)
        assert envelope["channel"] == "gp" and "MQTT-1" in envelope["payload"]
        wait_for(lambda: "NotRouted" in topics(hub, "MQTT-2"), what="provisional identity not routed")
        assert got.empty()
    finally:
        subscriber.loop_stop()
        subscriber.disconnect()


def test_redeliver_a_channel_since_a_time_sends_again_and_records_who_asked(relais, tmp_path: Path) -> None:
    routes = tmp_path / "routes"
    routes.mkdir()
    (routes / "drop.toml").write_text(
        f'[[destination]]\nname = "drop"\ntype = "file"\n[destination.settings]\nfolder = "{tmp_path / "out"}"\n'
    )
    hub = relais(routing={"enabled": True, "routes_dir": str(routes)})
    for i in range(2):
        assert send(hub.port, adt("A01", control_id=f"AGAIN-{i}")) == "AA"
    wait_for(lambda: all("Delivered" in topics(hub, f"AGAIN-{i}") for i in range(2)), what="deliveries")
    config = tmp_path / "relais0" / "config.toml"
    config.write_text('[store]\nurl = "sqlite:///relais.db"\nblob_dir = "blobs"\n')
    asked = subprocess.run(
        [RELAIS, "--config", str(config), "redeliver", "--channel", "drop", "--since", "2000-01-01",
         "--by", "integrateur", "--reason", "partner lost its files"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    for i in range(2):
        wait_for(lambda i=i: topics(hub, f"AGAIN-{i}").count("Delivered") == 2, what="second delivery")
        assert "Redelivered" in topics(hub, f"AGAIN-{i}")
    assert len(list((tmp_path / "out").iterdir())) == 2  # same bytes, same files: nothing doubled
    bad = subprocess.run([RELAIS, "--config", str(config), "redeliver", "--channel", "drop"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "--since" in bad.stderr


def read_frames(sock, count: int, timeout: float = 10.0) -> list[Er7Message]:
    sock.settimeout(timeout)
    buf = b""
    while buf.count(b"\x1c") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return [Er7Message.parse(f.strip(b"\x0b\r").decode()) for f in buf.split(b"\x1c") if f.strip(b"\x0b\r")]


def test_enhanced_mode_application_ack_follows_routing(relais, tmp_path: Path) -> None:
    import socket

    partner = relais()
    hub = routed_relais(relais, tmp_path, partner.port)
    with socket.create_connection(("127.0.0.1", hub.port)) as sock:
        routed = adt("A01", control_id="APP-1", accept_ack="AL", app_ack="AL")
        sock.sendall(b"\x0b" + routed.encode() + b"\x1c\r")
        commit, application = read_frames(sock, 2)
        assert (commit.get("MSA-1"), commit.get("MSA-2")) == ("CA", "APP-1")
        assert (application.get("MSA-1"), application.get("MSA-2")) == ("AA", "APP-1")
        assert application.get("MSH-10") != commit.get("MSH-10")
        # The sender lost the application ACK and resends: both ACKs again, routed once.
        sock.sendall(b"\x0b" + routed.encode() + b"\x1c\r")
        again = read_frames(sock, 2)
        assert [a.get("MSA-1") for a in again] == ["CA", "AA"]
        assert again[1].segments == application.segments
        assert topics(hub, "APP-1").count("MessageRouted") == 1
        # Not routed (A28 is outside the channel's filter): AE with the reason.
        sock.sendall(b"\x0b" + adt("A28", control_id="APP-2", accept_ack="AL", app_ack="AL").encode() + b"\x1c\r")
        commit, application = read_frames(sock, 2)
        assert commit.get("MSA-1") == "CA" and application.get("MSA-1") == "AE"
        assert "not routed" in application.get("MSA-3") and application.get("ERR-3.1") == "207"
        # ER: an application ACK only on error; SU: only on success.
        sock.sendall(b"\x0b" + adt("A01", control_id="APP-3", accept_ack="NE", app_ack="ER").encode() + b"\x1c\r")
        sock.sendall(b"\x0b" + adt("A28", control_id="APP-4", accept_ack="NE", app_ack="SU").encode() + b"\x1c\r")
        sock.sendall(b"\x0b" + adt("A01", control_id="APP-5", accept_ack="NE", app_ack="SU").encode() + b"\x1c\r")
        [only] = read_frames(sock, 1)
        assert (only.get("MSA-1"), only.get("MSA-2")) == ("AA", "APP-5")
        sock.settimeout(1.0)
        try:
            extra = sock.recv(65536)
        except TimeoutError:
            extra = b""
        assert extra == b""


def test_a_partner_down_does_not_hold_other_destinations(relais, tmp_path: Path) -> None:
    partner = relais()
    port = partner.port
    partner.stop()  # down for the whole test
    routes = tmp_path / "routes"
    channel_file(routes, port, attempts=100)
    (routes / "archive.toml").write_text(
        f'[[destination]]\nname = "archive"\ntype = "file"\n[destination.settings]\nfolder = "{tmp_path / "arch"}"\n'
    )
    hub = relais(routing={"enabled": True, "routes_dir": str(routes)})
    for i in range(3):
        assert send(hub.port, adt("A01", control_id=f"SIDE-{i}")) == "AA"
    wait_for(lambda: len(list((tmp_path / "arch").glob("[!.]*"))) == 3, what="the archive to get all three")
    assert "DeliveryFailed" in topics(hub, "SIDE-0")  # the partner's retries go on meanwhile


def test_routing_and_delivery_on_a_postgresql_store(relais, tmp_path: Path, pg_url: str) -> None:
    partner = relais()
    routes = tmp_path / "routes"
    channel_file(routes, partner.port)
    hub = relais(store={"url": pg_url, "blob_dir": "blobs"}, routing={"enabled": True, "routes_dir": str(routes)})
    for i in range(3):
        assert send(hub.port, adt("A01", control_id=f"PGR-{i}")) == "AA"
    assert send(hub.port, adt("A28", control_id="PGR-X")) == "AA"
    wait_for(lambda: all("Delivered" in topics(hub, f"PGR-{i}") for i in range(3)), what="deliveries on PostgreSQL")
    wait_for(lambda: "NotRouted" in topics(hub, "PGR-X"), what="NotRouted on PostgreSQL")
    assert [m.get("MSH-10") for m in received_by(partner)] == [f"PGR-{i}" for i in range(3)]
    assert received_by(partner)[0].get("MSH-4") == "750712184"
    wait_for(lambda: hub.store.query("SELECT 1 AS x FROM relais_identifiers"), what="search index on PostgreSQL")
    assert hub.store.verify_chain().ok


def test_application_ack_of_a_resend_after_restart_comes_from_the_log(relais, tmp_path: Path) -> None:
    import socket

    partner = relais()
    hub = routed_relais(relais, tmp_path, partner.port)
    message = adt("A01", control_id="APP-R", accept_ack="AL", app_ack="AL")
    with socket.create_connection(("127.0.0.1", hub.port)) as sock:
        sock.sendall(b"\x0b" + message.encode() + b"\x1c\r")
        first = read_frames(sock, 2)
    hub.stop()
    again = restarted_hub(relais, tmp_path)
    with socket.create_connection(("127.0.0.1", again.port)) as sock:
        sock.sendall(b"\x0b" + message.encode() + b"\x1c\r")
        second = read_frames(sock, 2)
    assert [a.get("MSA-1") for a in second] == ["CA", "AA"]
    assert [a.segments for a in second] == [a.segments for a in first]


def test_a_partner_that_never_answers_does_not_hold_other_destinations(relais, tmp_path: Path) -> None:
    # It takes connections and reads, never ACKs: every attempt waits for `ack_timeout` (2 s)
    # on the partner's one connection, while the other attempts of that partner queue for it.
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def swallow() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = silent.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setblocking(False)
            accepted.append(conn)

    stop = threading.Event()
    thread = threading.Thread(target=swallow, daemon=True)
    thread.start()
    try:
        routes = tmp_path / "routes"
        channel_file(routes, silent.getsockname()[1], attempts=100)
        (routes / "archive.toml").write_text(
            f'[[destination]]\nname = "archive"\ntype = "file"\n'
            f'[destination.settings]\nfolder = "{tmp_path / "arch"}"\n'
        )
        hub = relais(routing={"enabled": True, "routes_dir": str(routes), "delivery_concurrency": 4})
        for i in range(12):  # twelve patients: twelve keys of the partner, all due at once
            assert send(hub.port, adt("A01", control_id=f"SLOW-{i}", ipp=f"9{i:05d}")) == "AA"
        wait_for(lambda: len(list((tmp_path / "arch").glob("[!.]*"))) == 12, timeout=8,
                 what="the archive to get all twelve while the partner keeps every attempt waiting")  # fmt: skip
    finally:
        stop.set()
        silent.close()
        thread.join(5)
        for conn in accepted:
            conn.close()
