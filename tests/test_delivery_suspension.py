"""A destination that is down is suspended after `suspend_after` failed attempts in a row:
one probe at a time, its other deliveries waiting without attempts or events, everything
delivered once it answers again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hl7.client import MLLPClient

from tests.conftest import adt, wait_for
from tests.test_routing import channel_file, received_by, topics


@pytest.mark.parametrize("suspend_after", [3, 0])
def test_a_partner_that_is_down_is_probed_not_hammered_and_gets_everything_once_back(
    relais, tmp_path: Path, suspend_after: int
) -> None:
    # 20 patients' messages for a partner that is down, retried every 0.05-0.2 s: each key on
    # its own would fail ~15 times in 3 s (0: what it costs without suspension).
    partner = relais()
    port = partner.port
    partner.stop()
    routes = tmp_path / "routes"
    channel_file(routes, port, attempts=1000, dest=f"suspend_after = {suspend_after}")
    hub = relais(routing={"enabled": True, "routes_dir": str(routes)})
    ids = [f"DOWN-{p}" for p in range(20)]
    with MLLPClient("127.0.0.1", hub.port) as client:
        for p, control_id in enumerate(ids):
            assert b"MSA|AA|" in client.send_message(adt("A08", control_id=control_id, ipp=f"DN{p:03d}", ins=None))

    def failures() -> int:
        return sum(topics(hub, control_id).count("DeliveryFailed") for control_id in ids)

    wait_for(lambda: failures() >= 20, what="a first attempt of every key")
    time.sleep(3)
    if suspend_after:
        # Suspended after 3 failures in a row: one probe at a time, spaced like retries.
        assert failures() < 60
    else:
        assert failures() > 100
    partner_again = relais(listeners={"mllp": [{"name": "mllp", "port": port}]})
    wait_for(lambda: len(received_by(partner_again)) == len(ids), timeout=20, what="every delivery")
    assert sorted(m.get("MSH-10") for m in received_by(partner_again)) == sorted(ids)
    # The partner has each message before the hub has committed its outcome: wait for that.
    wait_for(lambda: all("Delivered" in topics(hub, c) for c in ids), what="every Delivered committed")
    for control_id in ids:
        assert topics(hub, control_id).count("Delivered") == 1


def test_a_suspended_destination_has_one_probe_at_a_time_spaced_like_retries() -> None:
    from engine.delivery import _Breaker
    from engine.routes import DestinationSpec

    spec = DestinationSpec(name="p", type="mllp", suspend_after=2, backoff_initial=10, backoff_max=40)
    breaker = _Breaker()
    assert not breaker.failed(0.0, spec, "d1") and breaker.probe(0.0, "d9")  # one failure: not yet
    assert breaker.failed(0.0, spec, "d2")  # the second in a row suspends it
    assert not breaker.failed(0.0, spec, "d3")  # already suspended: said once
    assert not breaker.probe(5.0, "d4")  # within ~10 s (±20 %): nothing
    assert breaker.probe(13.0, "d4") and not breaker.probe(13.0, "d5")  # one probe at a time
    breaker.failed(13.5, spec, "d6")  # another attempt's failure does not end the probe
    assert not breaker.probe(100.0, "d5")
    breaker.failed(14.0, spec, "d4")  # the probe failed: the next one in ~20 s
    assert not breaker.probe(29.0, "d5") and breaker.probe(38.0, "d5")
