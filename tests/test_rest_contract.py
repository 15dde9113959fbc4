"""The REST API against its own OpenAPI document (schemathesis on the live server), over
TLS, and when the store cannot commit."""

from __future__ import annotations

import ssl
import uuid
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from engine.rest_intake import ins_key
from tests.test_rest_api import auth, document, start
from tests.tls_material import make_pki

# Valid INS for generated submissions (the pattern alone says nothing of the control key).
schemathesis.openapi.format("ins", st.from_regex(r"\A[12][0-9]{12}\Z").map(lambda first13: first13 + ins_key(first13)))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_documented_operation_answers_as_documented(relais, mode: GenerationMode) -> None:
    """Generated requests (valid ones, then invalid ones) get only documented status codes,
    content types and bodies that match the published schemas; never a server error."""
    _, url = start(relais)
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 3
    for operation in operations:
        # Negative cases: the token is fixed, so what is invalid is the request itself.
        fixed = auth("hospital") if mode is GenerationMode.NEGATIVE else None
        strategy = operation.as_strategy(generation_mode=mode, headers=fixed)

        @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def call(case: schemathesis.Case) -> None:
            headers = auth("hospital")
            if mode is GenerationMode.POSITIVE:  # a generated key reused with another body is refused
                headers["Idempotency-Key"] = str(uuid.uuid4())
            case.call_and_validate(base_url=url, headers=headers)

        call()


def test_tls_listener_serves_https_only(relais, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    _running, url = start(relais, tls={"cert": str(pki.server_cert), "key": str(pki.server_key)})
    https = url.replace("http://", "https://")
    context = ssl.create_default_context(cafile=str(pki.ca))
    with httpx.Client(base_url=https, verify=context, headers=auth("hospital")) as client:
        r = client.post("/v1/submissions", json=document())
        assert r.status_code == 202, r.text
        assert client.get(r.headers["location"]).json()["status"] == "accepted"
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{url}/v1/submissions", json=document(), headers=auth("hospital"))  # plain HTTP


def test_tls_listener_can_require_a_client_certificate(relais, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key), "client_ca": str(pki.ca),
           "require_client_cert": True}  # fmt: skip
    _, url = start(relais, tls=tls)
    https = url.replace("http://", "https://")
    anonymous = ssl.create_default_context(cafile=str(pki.ca))
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{https}/v1/submissions", json=document(), headers=auth("hospital"), verify=anonymous)
    known = ssl.create_default_context(cafile=str(pki.ca))
    known.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    r = httpx.post(f"{https}/v1/submissions", json=document(), headers=auth("hospital"), verify=known)
    assert r.status_code == 202


def test_store_that_cannot_commit_answers_503_with_retry_after(relais) -> None:
    running, url = start(relais, max_body_bytes=20_000)
    assert running.app.ingestor is not None
    running.loop_call(running.app.ingestor.stop())
    r = httpx.post(f"{url}/v1/submissions", json=document(), headers=auth("hospital"))
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.headers["content-type"] == "application/problem+json"
    # Refusals are recorded before they are answered: one that cannot be is a 503 too.
    invalid = httpx.post(f"{url}/v1/submissions", json={"kind": "nothing"}, headers=auth("hospital"))
    assert invalid.status_code == 503 and invalid.headers["retry-after"] == "5"
    oversized = httpx.post(f"{url}/v1/submissions", content=b"x" * 20_001,
                           headers={**auth("hospital"), "Content-Type": "application/json"})  # fmt: skip
    assert oversized.status_code == 503 and oversized.headers["retry-after"] == "5"
    hl7 = httpx.post(
        f"{url}/v1/hl7",
        content=b"MSH|^~\\&|A|B|C|D|20261123||ADT^A01|X1|P|2.5\r",
        headers={**auth("hospital"), "Content-Type": "application/hl7-v2"},
    )
    assert hl7.status_code == 503 and hl7.headers["retry-after"] == "5"
    big_hl7 = httpx.post(f"{url}/v1/hl7", content=b"MSH|^~\\&|" + b"x" * 20_001,
                         headers={**auth("hospital"), "Content-Type": "application/hl7-v2"})  # fmt: skip
    assert big_hl7.status_code == 503 and big_hl7.headers["retry-after"] == "5"
