"""The views without a kernel: filter parsing and matching on crafted events,
the top tables' arithmetic, line and JSON output, and bad filters on the
command line (one line, exit status 2)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from ebpf_otlp.views.events import SIGNALS
from ebpf_otlp.views.filters import FilterError, parse
from ebpf_otlp.views.observe import Printer, json_line, line
from ebpf_otlp.views.tables import TopState, rate

T = 1_700_000_000_000_000_000

TCP_CLOSE = {"time": T, "signal": "tcp", "event": "close",
             "network.tcp.handshake.role": "client", "network.transport": "tcp",
             "network.type": "ipv4", "server.address": "10.0.0.2", "server.port": 443,
             "client.address": "10.0.0.1", "client.port": 40000, "process.pid": 42,
             "process.executable.name": "curl", "network.tcp.connection.duration": 0.5,
             "network.tcp.bytes.transmit": 100, "network.tcp.bytes.receive": 2000,
             "network.tcp.retransmits": 1, "network.tcp.rtt": 0.001}
DNS = {"time": T, "signal": "dns", "event": "lookup", "dns.question.name": "www.Example.com",
       "dns.question.type": "A", "dns.response_code": "NOERROR", "dns.answer.count": 1,
       "server.address": "fd00::53", "server.port": 53, "network.transport": "udp",
       "client.address": "fd00::1", "client.port": 5353, "dns.lookup.duration": 0.002}
DROP = {"time": T, "signal": "drops", "event": "drop", "network.drop.reason": "NO_SOCKET",
        "network.type": "ipv4", "network.transport": "udp", "source.address": "10.0.0.1",
        "source.port": 1234, "destination.address": "192.168.1.9", "destination.port": 9,
        "network.packet.drops": 3}
FLOW = {"time": T, "signal": "flows", "event": "flow", "source.address": "10.0.0.1",
        "source.port": 5000, "destination.address": "10.0.0.2", "destination.port": 80,
        "network.transport": "tcp", "network.type": "ipv4", "network.io.direction": "transmit",
        "network.interface.name": "eth0", "network.flow.bytes": 3_000_000,
        "network.flow.packets": 2000, "network.flow.segments": 2000, "interval.seconds": 2.0,
        "network.flow.bytes.rate": 1_500_000.0}
ALL = {"tcp": TCP_CLOSE, "dns": DNS, "drops": DROP, "flows": FLOW}


@pytest.mark.parametrize("kw,matching", [
    ({}, {"tcp", "dns", "drops", "flows"}),
    ({"signals": ["tcp,dns"]}, {"tcp", "dns"}),
    ({"ip": ["10.0.0.0/24"]}, {"tcp", "drops", "flows"}),
    ({"ip": ["fd00::/64"]}, {"dns"}),
    ({"from_ip": ["10.0.0.1"]}, {"tcp", "drops", "flows"}),
    ({"to_ip": ["192.168.0.0/16"]}, {"drops"}),
    ({"to_ip": ["10.0.0.1"]}, set()),
    ({"port": ["53", "9"]}, {"dns", "drops"}),
    ({"port": ["443"]}, {"tcp"}),
    ({"protocol": ["UDP"]}, {"dns", "drops"}),
    ({"drop_reason": ["no_socket"]}, {"drops"}),
    ({"drop_reason": ["SKB_DROP_REASON_NO_SOCKET"]}, {"drops"}),
    ({"dns_name": ["*.example.com."]}, {"dns"}),
    ({"dns_name": ["example.com"]}, set()),
    ({"pid": ["42"]}, {"tcp"}),
    ({"comm": ["curl"]}, {"tcp"}),
    ({"comm": ["wget"]}, set()),
    ({"ip": ["10.0.0.0/8"], "port": ["80"], "protocol": ["tcp"]}, {"flows"}),
])
def test_each_filter_keeps_exactly_the_matching_events(kw, matching) -> None:
    f = parse(**kw)
    assert {name for name, ev in ALL.items() if f(ev)} == matching


@pytest.mark.parametrize("kw,message", [
    ({"signals": ["tcp,http2"]}, "--signal: unknown http2"),
    ({"ip": ["10.0.0.300"]}, "--ip: '10.0.0.300' is not an IP address or CIDR"),
    ({"from_ip": ["10.0.0.0/33"]}, "--from-ip"),
    ({"to_ip": ["host"]}, "--to-ip"),
    ({"port": ["0"]}, "--port: 0 is not within 1..65535"),
    ({"port": ["http"]}, "--port: 'http' is not a number"),
    ({"protocol": ["tcpp"]}, "--protocol: unknown tcpp"),
    ({"drop_reason": ["NO_SUCH"], "known_reasons": ["NO_SOCKET"]}, "no drop reason 'NO_SUCH'"),
    ({"dns_name": ["a b"]}, "--dns-name"),
    ({"pid": ["-1"]}, "--pid"),
    ({"comm": ["a-process-name-too-long"]}, "--comm"),
])
def test_bad_filters_are_refused_with_the_flag_named(kw, message) -> None:
    with pytest.raises(FilterError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse(**kw)


def test_filters_imply_the_signals_they_can_match() -> None:
    assert parse(dns_name=["x"]).implied_signals() == {"dns"}
    assert parse(drop_reason=["NO_SOCKET"]).implied_signals() == {"drops"}
    assert parse(pid=["1"]).implied_signals() == {"tcp", "http"} & set(SIGNALS)
    assert parse(signals=["dns"], pid=["1"]).implied_signals() == set()


CLI_CASES = [
    (["observe", "--port", "70000"], "--port: 70000 is not within 1..65535"),
    (["observe", "--ip", "nope"], "--ip: 'nope' is not an IP address"),
    (["observe", "--signal", "bogus"], "--signal: unknown bogus"),
    (["observe", "--protocol", "xyz"], "--protocol: unknown xyz"),
    (["observe", "--drop-reason", "NOT_A_REASON"], "no drop reason 'NOT_A_REASON'"),
    (["observe", "--signal", "dns"], "dns and flows need --iface"),
    (["observe", "--signal", "tcp", "--dns-name", "x"], "leave no signal"),
    (["top", "--to-ip", "1.2.3.4/40"], "--to-ip"),
    (["top", "--pid", "x"], "--pid: 'x' is not a number"),
]


@pytest.mark.parametrize("args,message", CLI_CASES)
def test_bad_filters_on_the_command_line_one_line_exit_2(args, message) -> None:
    res = subprocess.run([sys.executable, "-m", "ebpf_otlp", *args], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert res.stdout == ""


def test_top_tables_rates_sorting_and_peers() -> None:
    st = TopState()
    st.add(FLOW)
    st.add(dict(FLOW, **{"source.port": 5001, "network.flow.bytes": 1000}))
    opened = dict(TCP_CLOSE, event="open")
    for _ in range(4):
        st.add(opened)
    st.add(dict(TCP_CLOSE, event="fail", **{"error.type": "refused"}))
    st.add(TCP_CLOSE)
    st.add(DNS)
    st.add(dict(DNS, **{"dns.response_code": "SERVFAIL", "error.type": "SERVFAIL"}))
    st.add(DROP)
    assert st.flows.rows == {}  # shown once the interval ends
    st.end_interval(2.0)
    flows = st.flows.sorted_rows()
    assert flows[0][0] == rate(1_500_000) == "1.50 MB/s" and "10.0.0.1:5000" in flows[0]
    assert flows[1][0] == "500 B/s"
    tcp = st.tcp.sorted_rows()
    assert tcp == [["4", "10.0.0.2:443", "client", "1", "2", "1.00", "2.5"]]  # fail + close
    dns = st.dns.sorted_rows()
    assert dns == [["2", "www.example.com", "A", "1", "50", "2.00", "SERVFAIL"]]
    drops = st.drops.sorted_rows()
    assert drops[0][:3] == ["3", "NO_SOCKET", "1.5"]
    st.flows.sort += 1  # by packets: the same order here
    assert st.flows.sorted_rows()[0][-1] == "2000"
    assert "IFACE" not in [c.title for c in st.flows.shown(80)]
    st.end_interval(1.0)
    assert st.flows.sorted_rows()[0][0] == "1.00 MB/s"  # 3 MB over the window's 3 s
    assert st.tcp.sorted_rows()[0][-1] == "0.0"
    st.end_interval(1.0)
    st.end_interval(1.0)
    assert st.flows.rows == {}  # out of the window


def test_line_and_json_output() -> None:
    text = line(TCP_CLOSE, colour=False)
    assert "10.0.0.1:40000 -> 10.0.0.2:443" in text and "tx 100B rx 2.0kB" in text
    assert "retrans 1" in text and "rtt 1.00ms" in text and "pid 42 curl" in text
    assert "\x1b[" not in text and "\x1b[" in line(TCP_CLOSE, colour=True)
    assert "[fd00::1]:5353 -> [fd00::53]:53" in line(DNS, colour=False)
    assert "NO_SOCKET  x3" in line(DROP, colour=False)
    obj = json.loads(json_line(DROP))
    assert obj["time_unix_nano"] == T and obj["network.drop.reason"] == "NO_SOCKET"
    assert obj["time"].startswith("2023-11-1")
    out = io.StringIO()
    p = Printer(out, as_json=True, colour=False, flows_top=1)
    p(FLOW)
    p(dict(FLOW, **{"network.flow.bytes": 5}))
    p(dict(TCP_CLOSE, event="rtt"))  # RTT samples are for top only
    assert out.getvalue() == ""
    p(None)  # end of the interval: the busiest flow only
    rows = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [r["network.flow.bytes"] for r in rows] == [3_000_000]


def test_spans_reach_the_view_through_its_exporter() -> None:
    """DNS (columns) and HTTP (records) hand their spans to the exporter: the view's
    exporter turns them into events, nothing is sent."""
    import numpy as np

    from ebpf_otlp.config import AgentConfig
    from ebpf_otlp.otlp import SPAN_KIND_SERVER, SpanRecord
    from ebpf_otlp.otlp.spans import SpanGroup
    from ebpf_otlp.views.session import LocalExporter, Session

    got = []
    exp = LocalExporter(AgentConfig(), on_spans=got.extend)
    http = SpanRecord(T, T + 2_000_000, "GET /items/{id}",
                      (("http.request.method", "GET"), ("url.path", "/items/7"),
                       ("http.response.status_code", 200), ("server.port", 8080),
                       ("process.pid", 7)), None, SPAN_KIND_SERVER)
    assert exp.submit_spans([http]) == 0
    groups = [SpanGroup("DNS A", (("dns.question.name", "a.test"), ("dns.question.type", "A"),
                                  ("dns.response_code", "NOERROR"))),
              SpanGroup("DNS A", (("dns.question.name", "b.test"), ("dns.question.type", "A")),
                        "timeout")]
    starts = np.array([T, T + 10, T + 20], np.uint64)
    assert exp.submit_span_groups(starts, starts + 1000, np.array([0, 1, 0]), groups,
                                  [("client.port", [1, 2, 3])]) == 0
    assert got[0] == http and len(got) == 4
    assert got[2] == SpanRecord(T + 10, T + 1010, "DNS A",
                                groups[1].attributes + (("client.port", 2),), "timeout")
    assert exp.senders["traces"].requests == 0  # nothing went anywhere
    exp.shutdown()

    class NoAgent:
        signals: list = []

        def __init__(self, *a, **kw) -> None:
            self.exporter = kw["exporter"]

    s = Session(NoAgent, AgentConfig())
    s.agent.exporter.submit_spans([http])
    s.agent.exporter.submit_span_groups(starts, starts + 1000, np.array([0, 1, 0]), groups,
                                        [("client.port", [1, 2, 3])])
    evs = s.pending()
    assert [(e["signal"], e["event"]) for e in evs] == [("http", "request")] + [
        ("dns", "lookup")] * 3
    http_ev, timeout_ev = evs[0], evs[2]
    assert http_ev["http.side"] == "server" and http_ev["url.path"] == "/items/7"
    assert http_ev["http.server.request.duration"] == 0.002
    assert "GET  /items/7  200  2.00ms  pid 7" in line(http_ev, colour=False)
    assert parse(port=["8080"])(http_ev) and not parse(port=["80"])(http_ev)
    assert timeout_ev["error.type"] == "timeout" and timeout_ev["client.port"] == 2
    assert timeout_ev["dns.lookup.duration"] == 1e-6
    TopState().add(http_ev)  # no HTTP table yet: ignored, not an error
