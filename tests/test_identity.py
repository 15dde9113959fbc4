"""The shipped channel routes/adt-to-identity.toml, deployed: ADT over MLLP feeds the regional
identity read model (regional identifiers, INS only when VALI, merges, identifier changes,
suspected duplicates), each change recorded as IdentityUpdated on its message."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import RunningRelais, adt, wait_for
from tests.test_routing import RELAIS, send, topics

ROUTES = Path(__file__).parent.parent / "routes"
CLINIQUE = ("SIH_NORD", "CLINIQUE_NORD")


def identity_hub(relais, tmp_path: Path, **kw) -> RunningRelais:
    routes = tmp_path / "routes"
    routes.mkdir()
    text = (ROUTES / "adt-to-identity.toml").read_text().replace("enabled = false", "enabled = true")
    (routes / "adt-to-identity.toml").write_text(text)
    (routes / "samples").symlink_to(ROUTES / "samples")
    return relais(routing={"enabled": True, "routes_dir": str(routes)}, **kw)


def from_clinique(message: str) -> str:
    """The same patient as the clinic knows them: its own IPP authority."""
    return message.replace("CHU_EXEMPLE&1.2.250.1.71.4.2.2", "CLINIQUE_NORD&1.2.250.1.71.4.2.7")


def mrg(ipp: str) -> str:
    return f"MRG|{ipp}^^^CHU_EXEMPLE&1.2.250.1.71.4.2.2&ISO^PI"


def applied(hub: RunningRelais, control_id: str) -> dict:
    """The IdentityUpdated event of a message, once its delivery is done."""
    wait_for(lambda: "Delivered" in topics(hub, control_id), what=f"identity delivery of {control_id}")
    row = hub.store.query("SELECT message_id FROM relais_messages WHERE control_id = ?", [control_id])[0]
    events = [e for e in hub.store.events_of(uuid.UUID(row["message_id"])) if e.topic == "relais.IdentityUpdated"]
    assert len(events) == 1
    return events[0].event


def owner(hub: RunningRelais, value: str) -> str:
    rows = hub.store.query("SELECT rri FROM relais_identity_ids WHERE value = ?", [value])
    return rows[0]["rri"] if rows else ""


def person(hub: RunningRelais, rri: str) -> dict:
    return hub.store.query("SELECT * FROM relais_identity_persons WHERE rri = ?", [rri])[0]


def cli(tmp_path: Path, hub: RunningRelais, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "cli.toml"
    config.write_text(
        f'[store]\nurl = "{hub.config.store_url}"\nblob_dir = "{hub.config.resolve(hub.config.store.blob_dir)}"\n'
    )
    return subprocess.run([RELAIS, "--config", str(config), *args], capture_output=True, text=True, timeout=60)


def test_two_facilities_share_one_regional_identity_through_a_qualified_ins(relais, tmp_path: Path) -> None:
    hub = identity_hub(relais, tmp_path)
    assert send(hub.port, adt("A28", control_id="ID-1", ipp="1001", ins="260058815400233")) == "AA"
    created = applied(hub, "ID-1")
    assert created["action"] == "created" and created["rri"].startswith("RRI")
    rri = created["rri"]
    assert owner(hub, "1001") == rri and owner(hub, "260058815400233") == rri
    assert person(hub, rri)["ins_oid"] == "1.2.250.1.213.1.4.8"

    # The clinic admits the same patient under its own IPP and the same qualified INS.
    assert send(hub.port, from_clinique(adt("A01", control_id="ID-2", sender=CLINIQUE, ipp="77"))) == "AA"
    joined = applied(hub, "ID-2")
    assert joined["action"] == "updated" and joined["rri"] == rri
    assert joined["linked"] == ["77^PI@1.2.250.1.71.4.2.7"]
    assert owner(hub, "77") == rri

    shown = cli(tmp_path, hub, "identity", "show", "77", "--json")
    assert shown.returncode == 0, shown.stderr
    card = json.loads(shown.stdout)
    assert card["rri"] == rri and {i["value"] for i in card["identifiers"]} == {"1001", "260058815400233", "77"}
    # A discharge is not an identity message: the channel does not take it.
    assert send(hub.port, adt("A03", control_id="ID-3", ipp="1001")) == "AA"
    wait_for(lambda: "NotRouted" in topics(hub, "ID-3"), what="A03 not routed")


def test_an_ins_without_vali_is_ignored_and_namesakes_are_flagged_not_merged(relais, tmp_path: Path) -> None:
    hub = identity_hub(relais, tmp_path)
    assert (
        send(hub.port, adt("A28", control_id="PROV-1", ipp="2001", ins="185057512345678", reliability="PROV")) == "AA"
    )
    first = applied(hub, "PROV-1")
    assert owner(hub, "185057512345678") == ""  # a provisional identity's INS is not used
    assert any("PID-32" in why and "PROV" in why for why in first["ignored"])
    assert person(hub, first["rri"])["ins"] == ""

    # The clinic sends the same person (same name, birth date, sex) without a shared identifier.
    message = from_clinique(adt("A28", control_id="PROV-2", sender=CLINIQUE, ipp="88", reliability="PROV"))
    assert send(hub.port, message) == "AA"
    second = applied(hub, "PROV-2")
    assert second["action"] == "created" and second["rri"] != first["rri"]
    assert second["suspected_duplicates"] == [first["rri"]]

    listed = cli(tmp_path, hub, "identity", "duplicates", "--json")
    assert listed.returncode == 0, listed.stderr
    pairs = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [{p["rri_a"], p["rri_b"]} for p in pairs] == [{first["rri"], second["rri"]}]
    assert pairs[0]["state"] == "open"


def test_merge_moves_identifiers_and_closes_the_duplicate_then_an_identifier_changes(relais, tmp_path: Path) -> None:
    hub = identity_hub(relais, tmp_path)
    assert send(hub.port, adt("A28", control_id="M-1", ipp="3001", ins=None, family="DURAND")) == "AA"
    assert send(hub.port, adt("A28", control_id="M-2", ipp="3002", ins=None, family="DURAND")) == "AA"
    keep, absorbed = applied(hub, "M-1")["rri"], applied(hub, "M-2")["rri"]
    assert applied(hub, "M-2")["suspected_duplicates"] == [keep]

    merge = adt("A40", control_id="M-3", ipp="3001", ins=None, family="DURAND", extra_segments=(mrg("3002"),))
    assert send(hub.port, merge) == "AA"
    merged = applied(hub, "M-3")
    assert merged["action"] == "merged" and merged["rri"] == keep and merged["merged_from"] == absorbed
    assert owner(hub, "3002") == keep
    assert person(hub, absorbed)["status"] == "merged" and person(hub, absorbed)["merged_into"] == keep
    left = cli(tmp_path, hub, "identity", "duplicates")
    assert left.returncode == 0 and left.stdout == "" and "no suspected duplicates" in left.stderr
    assert "merged" in cli(tmp_path, hub, "identity", "duplicates", "--all").stdout

    # A later message about the absorbed IPP's old identity lands on the survivor.
    change = adt("A47", control_id="M-4", ipp="3010", ins=None, family="DURAND", extra_segments=(mrg("3001"),))
    assert send(hub.port, change) == "AA"
    changed = applied(hub, "M-4")
    assert changed["action"] == "identifier_changed" and changed["rri"] == keep
    assert owner(hub, "3001") == "" and owner(hub, "3010") == keep
    text = cli(tmp_path, hub, "identity", "show", absorbed).stdout
    assert f"merged into {keep}" in text


def test_an_identifier_change_for_an_unknown_patient_is_dead_lettered_and_redelivery_is_applied_once(
    relais, tmp_path: Path
) -> None:
    hub = identity_hub(relais, tmp_path)
    bad = adt("A47", control_id="U-1", ipp="4010", ins=None, extra_segments=(mrg("4999"),))
    assert send(hub.port, bad) == "AA"  # accepted: the problem is the model's, not the message's
    wait_for(lambda: "DeadLettered" in topics(hub, "U-1"), what="dead letter")
    dead = cli(tmp_path, hub, "deadletters", "list")
    assert "adt-to-identity/regional-identity" in dead.stdout and "identifier to change is unknown" in dead.stdout
    assert "4999" not in dead.stdout  # the reason names no patient identifier

    assert send(hub.port, adt("A28", control_id="U-2", ipp="5001", ins=None, family="LEROY")) == "AA"
    rri = applied(hub, "U-2")["rri"]
    message_id = hub.store.query("SELECT message_id FROM relais_messages WHERE control_id = 'U-2'")[0]["message_id"]
    again = cli(tmp_path, hub, "redeliver", message_id, "--by", "cellule-identito", "--reason", "check")
    assert again.returncode == 0, again.stderr
    wait_for(lambda: topics(hub, "U-2").count("Delivered") == 2, what="second delivery")
    assert topics(hub, "U-2").count("IdentityUpdated") == 1  # applied once
    assert hub.store.query("SELECT COUNT(*) AS n FROM relais_identity_persons")[0]["n"] == 1
    assert owner(hub, "5001") == rri


@pytest.mark.postgres
def test_identity_model_on_a_postgresql_store(relais, tmp_path: Path, pg_url: str) -> None:
    hub = identity_hub(relais, tmp_path, store={"url": pg_url, "blob_dir": "blobs"})
    assert send(hub.port, adt("A28", control_id="PG-1", ipp="6001", family="PETIT")) == "AA"
    assert (
        send(hub.port, from_clinique(adt("A01", control_id="PG-2", sender=CLINIQUE, ipp="61", family="PETIT"))) == "AA"
    )
    assert applied(hub, "PG-1")["rri"] == applied(hub, "PG-2")["rri"] == owner(hub, "61")
    shown = cli(tmp_path, hub, "identity", "show", "6001", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["family"] == "PETIT"
