"""The mapping alone: the scripted stream in, aggregated rows, spans and logs out,
compared with the hand-written expectations of hubble_script."""

from __future__ import annotations

import hubble_script as hs
import pytest

from ebpf_otlp.signals.hubble._proto.flow import flow_pb2 as fpb
from ebpf_otlp.signals.hubble._proto.observer import observer_pb2 as opb
from ebpf_otlp.signals.hubble.l7 import route_template, split_url
from ebpf_otlp.signals.hubble.mapping import Mapper


def test_script_maps_exactly():
    s = hs.build()
    m = Mapper()
    m.feed(s.events)
    out = m.drain()
    hs.assert_mapped(out)
    by = hs.sums_by_name(out)
    assert by["ebpf_otlp.events.received"] == {(("source", "hubble"),): len(s.events)}
    # The one unknown drop reason (999) is counted as such, nothing else is malformed.
    assert by["ebpf_otlp.hubble.malformed"] == {
        (("reason", "unknown_enum"), ("field", "drop_reason_desc")): 1}
    assert "shop/deny-world" in out.logs[0].body and out.logs[0].severity_text == "WARN"
    # A second drain is empty: deltas.
    again = m.drain()
    assert not again.sums and not again.spans and not again.histograms and not again.logs


def test_replayed_events_are_not_counted_twice():
    s = hs.build()
    m = Mapper()
    m.feed(s.events[:20])
    m.feed(s.events[15:])  # a reconnect that resumes from an earlier point
    out = m.drain()
    hs.assert_mapped(out)
    by = hs.sums_by_name(out)
    assert sum(by["ebpf_otlp.hubble.duplicates"].values()) == 5  # a LostEvent among them
    assert sum(by["ebpf_otlp.events.lost"].values()) == hs.EXPECTED_LOST


def test_unknown_enums_and_odd_events_are_counted_not_fatal():
    m = Mapper()
    r = opb.GetFlowsResponse()
    f = r.flow
    f.verdict = 77  # unknown verdict
    f.event_type.type = 5
    f.policy_match_type = 42
    f.IP.source, f.IP.destination = "10.0.0.1", "10.0.0.2"
    empty = opb.GetFlowsResponse()  # no oneof set
    node = opb.GetFlowsResponse()
    node.node_status.message = "x"
    noip = opb.GetFlowsResponse()
    noip.flow.event_type.type = 4
    l7odd = opb.GetFlowsResponse()
    l7odd.flow.event_type.type = 129
    l7odd.flow.l7.type = 9
    l7odd.flow.l7.http.method = "GET"
    sock = opb.GetFlowsResponse()
    sock.flow.event_type.type = 7
    lost = opb.GetFlowsResponse()
    lost.lost_events.source = 12
    lost.lost_events.num_events_lost = 3
    m.feed([r, empty, node, noip, l7odd, sock, lost])
    sums = m.drain().sums
    mal = {a: n for (name, a), n in sums.items() if name == "ebpf_otlp.hubble.malformed"}
    assert mal == {
        (("reason", "unknown_enum"), ("field", "verdict")): 1,
        (("reason", "unknown_enum"), ("field", "policy_match_type")): 1,
        (("reason", "empty"),): 1,
        (("reason", "no_ip"),): 1,
        (("reason", "unknown_enum"), ("field", "l7.type")): 1,
        (("reason", "unknown_enum"), ("field", "lost_events.source")): 1,
    }
    ign = {a: n for (name, a), n in sums.items() if name == "ebpf_otlp.hubble.ignored"}
    assert ign == {(("kind", "node_status"),): 1, (("kind", "event_type_7"),): 1}
    verdicts = [a for (name, a), _ in sums.items() if name == "network.policy.verdicts"]
    assert dict(verdicts[0])["network.policy.verdict"] == "unknown_77"
    assert dict(verdicts[0])["network.policy.match_type"] == "unknown_42"
    lost_pts = {a: n for (name, a), n in sums.items() if name == "ebpf_otlp.events.lost"}
    assert lost_pts == {(("source", "hubble"), ("hubble.lost.source", "unknown_12")): 3}


def test_series_and_pending_are_bounded():
    m = Mapper(max_series=3, max_pending=2, l7_timeout_s=1.0)
    s = hs.Script()
    for port in range(10):
        s._flow(hs.CLIENT, hs.WEB, "TCP", 30000 + port, 80, event=4, reply=False)
    for i in range(3):
        f = s._flow(hs.CLIENT, hs.WEB, "TCP", 41000 + i, 80, event=129, direction=fpb.EGRESS)
        f.l7.type = fpb.REQUEST
        f.l7.http.method, f.l7.http.url = "GET", f"http://web/{'abc'[i]}"
    m.feed(s.events)
    out = m.drain()
    pk = {a: n for (name, a), n in out.sums.items() if name == "network.flow.packets"}
    assert len(pk) == 4 and pk[(("otel.metric.overflow", True),)] == 7
    assert out.sums[("ebpf_otlp.hubble.series.overflow", ())] == 7
    assert out.sums[("ebpf_otlp.hubble.pending.evicted", (("protocol", "http"),))] == 1
    assert m.pending() == 2
    # The stream's clock moves past the timeout: the two waiting requests time out.
    s._flow(hs.CLIENT, hs.WEB, "TCP", 1, 80, event=4, reply=False, dt_ns=2_000_000_000)
    m.feed(s.events[-1:])
    out = m.drain()
    assert sorted(it[2] for _, it in out.spans) == ["GET /b", "GET /c"]
    assert all(it[4] == "timeout" and it[1] - it[0] == 1_000_000_000 for _, it in out.spans)
    assert m.pending() == 0


def test_denial_logs_rate_limited_and_counted():
    m = Mapper(denial_log_rate=0.0, denial_log_burst=2)
    s = hs.Script()
    for port in range(5):
        s._flow(hs.CLIENT, hs.WORLD, "TCP", 40000, 1000 + port, event=5,
                verdict=fpb.DROPPED, direction=fpb.EGRESS)
    m.feed(s.events)
    out = m.drain()
    assert len(out.logs) == 2
    assert out.sums[("ebpf_otlp.hubble.logs.suppressed", ())] == 3


@pytest.mark.parametrize("path,route", [("/", "/"), ("/users/42/orders", "/users/*/orders"),
                                        ("/o/123e4567-e89b-12d3-a456-426614174000", "/o/*"),
                                        ("/blob/deadbeef00", "/blob/*"), ("/api/v2", "/api/v2")])
def test_route_template(path, route):
    assert route_template(path) == route


def test_split_url():
    assert split_url("http://web:8080/a/b?q=1#f") == ("http", "web:8080", "/a/b")
    assert split_url("/a?q") == (None, None, "/a")
    assert split_url("") == (None, None, "/")


def test_response_without_request_is_a_span_timed_by_hubble_and_counted():
    m = Mapper()
    s = hs.Script()
    f = s._flow(hs.WEB, hs.CLIENT, "TCP", 80, 40100, event=129, direction=fpb.INGRESS,
                reply=True)
    f.l7.type = fpb.RESPONSE
    f.l7.latency_ns = 5_000_000
    f.l7.http.code, f.l7.http.method, f.l7.http.url = 404, "GET", "http://web/missing"
    m.feed(s.events)
    out = m.drain()
    assert out.sums[("ebpf_otlp.hubble.unmatched", (("protocol", "http"),))] == 1
    (kind, (start, end, name, attrs, err)), = out.spans
    assert (name, end - start, err) == ("GET /missing", 5_000_000, None)  # 404: no server error
    a = dict(attrs)
    # The response travels server -> client: the server is its source.
    assert (a["server.address"], a["server.port"], a["client.address"]) == (
        "10.0.2.20", 80, "10.0.1.10")
    assert a["http.response.status_code"] == 404


def test_dns_names_option_and_dedup_memory():
    s = hs.build()
    m = Mapper(dns_names=True, dedup_memory=4)
    m.feed(s.events)
    hist = [dict(a) for name, a, _ in m.drain().histograms if name == "dns.lookup.duration"]
    assert sorted(h["dns.question.name"] for h in hist) == ["example.com", "missing.example"]
    # Only the last 4 uuids are remembered: an older event replayed counts again.
    m.feed([s.events[0], s.events[-1]])
    by = hs.sums_by_name(m.drain())
    assert sum(by["network.flow.packets"].values()) == 1
    assert sum(by["ebpf_otlp.hubble.duplicates"].values()) == 1


def test_a_timestamp_from_the_future_does_not_move_the_stream_clock():
    s = hs.build()
    m = Mapper()
    m.feed(s.events[:3])
    before = m.stream_time_ns
    odd = hs.Script(start_ns=before + 3600 * 10**9)  # an hour ahead
    odd._flow(hs.CLIENT, hs.WEB, "TCP", 1, 2, event=4, reply=False)
    odd.events[0].flow.uuid = "future"
    m.feed(odd.events)
    assert m.stream_time_ns == before
    out = m.drain()
    assert out.sums[("ebpf_otlp.hubble.malformed", (("reason", "future_time"),))] == 1
    assert sum(hs.sums_by_name(out)["network.flow.packets"].values()) == 4  # still counted


def test_spans_per_interval_are_bounded_and_counted():
    s = hs.build()
    m = Mapper(max_spans=1)
    m.feed(s.events)
    out = m.drain()
    assert len(out.spans) == 1 and len(out.histograms) == 4
    assert out.sums[("ebpf_otlp.hubble.spans.dropped", (("reason", "interval_full"),))] == 3
