"""The usage ledger exported as CloudEvents to an OpenMeter-compatible ingest endpoint: a
local HTTP receiver (OpenMeter itself needs Kafka and ClickHouse) that checks each event's
shape, refuses the first batches (the export retries), and counts events by id. Every record
arrives, with its stable id, across a Weaver that is killed and started again; none is lost."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from integration.test_executions import register, run
from integration.test_usage_ledger import ledger
from support.cluster import PYTHON, Cluster, eventually

pytestmark = pytest.mark.integration

TOKEN = "om-secret-7"
FIELDS = {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data"}


class Receiver:
    def __init__(self) -> None:
        self.events: dict[str, dict[str, Any]] = {}
        self.sent_again = 0
        self.refuse = 2  # the first batches fail: the export must retry them
        self.problems: list[str] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    if self.headers.get("authorization") != f"Bearer {TOKEN}":
                        receiver.problems.append("no token")
                    kind = self.headers.get("content-type", "")
                    if kind != "application/cloudevents-batch+json":
                        receiver.problems.append(f"content type {kind}")
                    if receiver.refuse > 0:
                        receiver.refuse -= 1
                        self.send_response(503)
                        self.end_headers()
                        return
                    for event in json.loads(body):
                        receiver.take(event)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/v1/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self, event: dict[str, Any]) -> None:
        if set(event) != FIELDS or event["specversion"] != "1.0":
            self.problems.append(f"not a CloudEvent: {sorted(event)}")
        if event["type"] != "treadle.usage" or not event["source"].startswith("treadle/"):
            self.problems.append(f"type or source: {event['type']} {event['source']}")
        seen = self.events.get(event["id"])
        if seen is not None:
            self.sent_again += 1
            if seen != event:
                self.problems.append(f"{event['id']} came again, different")
        self.events[event["id"]] = event


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    try:
        yield found
    finally:
        found.server.shutdown()
        found.server.server_close()


def test_every_record_arrives_once_by_id_across_a_restart(
    tmp_path: Path, receiver: Receiver
) -> None:
    cluster = Cluster(tmp_path)
    settings = {"openmeter_url": receiver.url, "openmeter_token": TOKEN, "openmeter_batch": "2"}
    try:
        cluster.start_weaver(**settings)
        cluster.start_shuttle("exported", "--price", "3.6")
        with cluster.client() as api:
            register(api, "exported", [PYTHON, "-c", "pass"])
            first = [run(api, "exported")["id"] for _ in range(3)]
            eventually(
                lambda: {f"execution/{e}/1/1" for e in first} <= set(receiver.events),
                timeout=60,
                what="the first records exported, after two refused batches",
            )
        assert cluster.weaver is not None
        cluster.weaver.stop(signal.SIGKILL)
        cluster.start_weaver(**settings)
        with cluster.client() as api:
            later = [run(api, "exported")["id"] for _ in range(2)]
            tenant = api.get(f"/v1/executions/{later[0]}").json()["tenant_id"]
            expected = {f"execution/{e}/1/1" for e in first + later}
            eventually(lambda: expected <= set(receiver.events), timeout=60, what="every record")
            metrics = api.get("/metrics").text
        rows = {e: ledger(cluster, e)[0] for e in first + later}
    finally:
        cluster.stop()
    assert receiver.problems == []
    for execution_id, row in rows.items():
        event = receiver.events[f"execution/{execution_id}/1/1"]
        assert (event["subject"], event["data"]["function"]) == (tenant, "exported")
        assert event["data"]["cost"] == row.cost and event["data"]["wall_s"] == row.wall_s
        assert event["data"]["final"] is True and event["time"].endswith("Z")
    assert "treadle_usage_export_lag_seconds" in metrics
