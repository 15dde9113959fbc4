"""Routing benchmark per kind of submission: how fast the router plans and commits the
decisions of stored HL7 messages, mails (an XDM of 3 documents each) and REST submissions.

Messages are first stored through the Ingestor (routing off), then the router's own
`plan` + commit run over the whole log: "msgs/s" is routing decisions committed with their
outbox rows and position per second, "plan ms" the planning part alone per message.

    .venv/bin/python bench/route_kinds.py [--messages 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.er7 import Er7Message  # noqa: E402
from engine.hl7_intake import read_metadata  # noqa: E402
from engine.ingest import Submission  # noqa: E402
from engine.mail_intake import read_submission  # noqa: E402
from engine.rest_intake import build_submission, parse_submission  # noqa: E402
from engine.router import Router  # noqa: E402
from engine.routes import load_channels  # noqa: E402
from tests.conftest import adt, make_config, start_relais  # noqa: E402
from tests.mail_samples import Doc, Mail, cda, xdm_zip  # noqa: E402

CHANNELS = {
    "hl7": """
[filter]
all = [{ message_type = "ADT^A0*" }, { sender = "SIH_CHU|*" }]
[[transform]]
set = "MSH-5"
value = "PARTNER"
[[destination]]
name = "out"
type = "file"
settings = { folder = "never" }
""",
    "documents": """
source.kinds = ["document"]
filter = { all = [{ metadata = "class_code", equals = "10" }, { identifier_authority = "1.2.250.1.213.1.4.8" }] }
[[destination]]
name = "out"
type = "file"
settings = { folder = "never" }
""",
    "mail": """
source.kinds = ["mail", "rest"]
filter = { metadata = "protocol", in = ["smtp", "rest"] }
[[destination]]
name = "archive"
type = "file"
settings = { folder = "never" }
""",
}


def submissions(kind: str, n: int, inline_limit: int) -> list[Submission]:
    out = []
    if kind == "mail":
        docs = [Doc(filename=f"DOC{i}.XML", data=cda(size=2000), class_code=c) for i, c in ((1, "10"), (2, "11"))]
        docs.append(Doc(filename="CR.PDF", mime_type="application/pdf", data=b"%PDF-1.4\n" + b"x" * 3000))
        raw = Mail(xdm=xdm_zip(docs)).bytes()
        for i in range(n):
            reading = read_submission(raw, ["secretariat@relais.localhost"], inline_limit)
            out.append(Submission("smtp", "smtp", "127.0.0.1:1", raw, "message/rfc822", "dr@h", f"m{i}", "MAIL",
                                  metadata={"patient_identifiers": [{"id": i, "type": "INS", "authority_oid": o}
                                                                    for i, o in reading.patient_ids]},
                                  events=reading.events, payloads=reading.payloads))  # fmt: skip
    elif kind == "rest":
        body = (
            '{"kind":"document","patient":{"ins":"260058815400233"},"documents":[{"filename":"cr.pdf",'
            '"content_type":"application/pdf","type_code":"11502-2","content":"'
            + base64.b64encode(b"%PDF-1.4 " * 300).decode()
            + '"}]}'
        ).encode()
        request, contents = parse_submission(body)
        for i in range(n):
            key = f"k{i}"
            out.append(build_submission(request, contents, listener="http", peer="127.0.0.1:1", client="bench",
                                        sender="bench", idempotency_key=key, inline_limit=inline_limit))  # fmt: skip
    else:
        for i in range(n):
            text = adt("A01", control_id=f"C{i}")
            out.append(Submission("mllp", "mllp", "127.0.0.1:1", text.encode(), "application/hl7-v2",
                                  "SIH_CHU|CHU_EXEMPLE", f"C{i}", "ADT", "A01",
                                  read_metadata(Er7Message.parse(text))))  # fmt: skip
    return out


def run(kind: str, n: int, home: Path) -> dict[str, Any]:
    routes = home / "routes"
    routes.mkdir(parents=True)
    for name, text in CHANNELS.items():
        (routes / f"{name}.toml").write_text(text)
    running = start_relais(make_config(home, routing={"enabled": False}))
    try:
        store, ingestor = running.store, running.app.ingestor
        assert ingestor is not None
        subs = submissions(kind, n, store.inline_limit)

        async def ingest() -> None:
            for i in range(0, len(subs), 200):
                await asyncio.gather(*(ingestor.submit(s) for s in subs[i : i + 200]))

        running.loop_call(ingest())
        router = Router(store, ingestor, load_channels(routes))
        position, planned, routed, deliveries = 0, 0.0, 0, 0
        started = time.perf_counter()
        while True:
            t = time.perf_counter()
            appendix, new = router.plan(position)
            planned += time.perf_counter() - t
            if new == position:
                break
            running.loop_call(ingestor.append(appendix))
            routed += sum(1 for _, e in appendix.events)
            deliveries += sum(len(getattr(e, "deliveries", [])) for _, e in appendix.events)
            position = new
        elapsed = time.perf_counter() - started
        return {"kind": kind, "messages": routed, "deliveries": deliveries, "msgs/s": routed / elapsed,
                "plan ms": planned * 1000 / max(routed, 1)}  # fmt: skip
    finally:
        running.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--kinds", nargs="+", default=["hl7", "mail", "rest"])
    args = parser.parse_args()
    print(f"{'kind':>6} {'messages':>9} {'deliveries':>11} {'msgs/s':>8} {'plan ms/msg':>12}")
    for kind in args.kinds:
        with tempfile.TemporaryDirectory() as tmp:
            r = run(kind, args.messages, Path(tmp))
        print(f"{r['kind']:>6} {r['messages']:>9} {r['deliveries']:>11} {r['msgs/s']:>8.0f} {r['plan ms']:>12.3f}")


if __name__ == "__main__":
    main()
