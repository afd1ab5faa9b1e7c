"""The GetFlows follower against a gRPC server implementing Observer from the
same protos: the scripted stream with a disconnect and a resume, garbage
messages, mutual TLS named as the hubble CLI names it, and back-off."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import grpc
import hubble_script as hs
import pytest
from hubble_server import HubbleServer, Running, ScriptedObserver, wait_until

from ebpf_otlp.signals.hubble.mapping import Mapper
from ebpf_otlp.signals.hubble.source_grpc import Backoff, GrpcFollower, TlsOptions

CLIENTS = pytest.mark.parametrize("client", ["h2", "grpcio"])


def _follow(address: str, client: str = "h2", **kw) -> Running:
    return Running(GrpcFollower(address, Mapper(), backoff=Backoff(0.05, 0.2), client=client,
                                **kw))


@CLIENTS
def test_stream_with_disconnect_and_resume(client):
    s = hs.build()
    cut = 12
    obs = ScriptedObserver(s.events, cut=cut)
    with HubbleServer(obs) as srv, _follow(srv.address, client) as f:
        assert obs.done.wait(20), "the bridge never came back for the rest"
        wait_until(lambda: f.follower.messages == len(s.events) + 1, "every message")
        out = f.mapper.drain()
    hs.assert_mapped(out)
    by = hs.sums_by_name(out)
    assert by["ebpf_otlp.hubble.reconnects"] == {(("reason", "unavailable"),): 1}
    assert by["ebpf_otlp.hubble.duplicates"] == {(("source", "hubble"),): 1}
    first, again = obs.requests
    assert first.follow and not first.HasField("since")
    # Resumed from the newest timestamp seen before the break.
    assert again.follow and again.since.ToNanoseconds() == s.events[cut - 1].time.ToNanoseconds()


@CLIENTS
def test_garbage_and_unknown_enums_counted_never_fatal(client):
    s = hs.build()
    odd = hs.Script()
    f = odd._flow(hs.CLIENT, hs.WEB, "TCP", 1, 2, event=4, reply=False)
    f.verdict = 99
    f.uuid = "odd-1"
    raw = [b"\xff\xff\xff", b"\x0a\x05abc", odd.events[0].SerializeToString()]
    obs = ScriptedObserver(s.events, raw=raw)
    with HubbleServer(obs, raw=True) as srv, _follow(srv.address, client) as fol:
        assert obs.done.wait(20)
        wait_until(lambda: fol.follower.messages == len(s.events) + 3, "every message")
        out = fol.mapper.drain()
    by = hs.sums_by_name(out)
    assert by["ebpf_otlp.hubble.malformed"] == {
        (("reason", "decode"),): 2,
        (("reason", "unknown_enum"), ("field", "verdict")): 1,
        (("reason", "unknown_enum"), ("field", "drop_reason_desc")): 1,
    }
    assert fol.follower.connections == 1 and "ebpf_otlp.hubble.reconnects" not in by
    # The flow with the unknown verdict is still a packet; the script is intact.
    pk = by["network.flow.packets"]
    assert sum(pk.values()) == sum(n for _, n in hs.EXPECTED_SUMS["network.flow.packets"]) + 1


@CLIENTS
def test_server_down_backs_off_and_counts(client):
    with socket.socket() as probe:  # a port nobody listens on after this
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with _follow(f"127.0.0.1:{port}", client) as f:
        wait_until(lambda: f.follower.backoff.current_s >= 0.2, "back-off to reach its cap")
    out = f.mapper.drain()
    n = hs.sums_by_name(out)["ebpf_otlp.hubble.reconnects"][(("reason", "unavailable"),)]
    assert 3 <= n < 50, n  # 0.05, 0.1, 0.2, ...: attempts are spaced, not a busy loop


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path):
    d = tmp_path
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=test hubble ca", cwd=d)
    for name, cn in (("server", "hubble.test"), ("client", "bridge")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
        (d / f"{name}.ext").write_text(f"subjectAltName=DNS:{cn}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
                 f"{name}.ext", cwd=d)
    return d


@CLIENTS
def test_mutual_tls_with_the_hubble_cli_options(client, pki):
    s = hs.build()
    creds = grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(), require_client_auth=True)
    tls = TlsOptions(enabled=True, ca_cert_files=(str(pki / "ca.pem"),),
                     client_cert_file=str(pki / "client.pem"),
                     client_key_file=str(pki / "client.key"), server_name="hubble.test")
    obs = ScriptedObserver(s.events)
    with HubbleServer(obs, credentials=creds) as srv:
        with _follow(srv.address, client, tls=tls) as f:
            assert obs.done.wait(20)
            wait_until(lambda: f.follower.messages == len(s.events), "every message over TLS")
        hs.assert_mapped(f.mapper.drain())
        # Without the client certificate the server refuses: counted, nothing mapped.
        bare = TlsOptions(enabled=True, ca_cert_files=(str(pki / "ca.pem"),),
                          server_name="hubble.test")
        with _follow(srv.address, client, tls=bare) as f:
            wait_until(lambda: f.follower.backoff.current_s > 0.05, "a refused attempt")
        out = f.mapper.drain()
        assert "network.flow.packets" not in hs.sums_by_name(out)
        assert sum(hs.sums_by_name(out)["ebpf_otlp.hubble.reconnects"].values()) >= 1


def test_server_address_forms_and_backoff_schedule():
    from ebpf_otlp.signals.hubble.source_grpc import parse_server

    assert parse_server("relay:80", TlsOptions()) == ("relay:80", TlsOptions())
    target, tls = parse_server("tls://relay:443", TlsOptions(server_name="x"))
    assert target == "relay:443" and tls.enabled and tls.server_name == "x"
    b = Backoff()
    waits = [b.next() for _ in range(9)]
    assert [round(b.initial_s * 2 ** i, 3) for i in range(6)] == [0.5, 1, 2, 4, 8, 16]
    for w, nominal in zip(waits, [0.5, 1, 2, 4, 8, 16, 30, 30, 30]):
        assert 0.8 * nominal <= w <= 1.2 * nominal, (w, nominal)
    b.reset()
    assert 0.4 <= b.next() <= 0.6


@CLIENTS
def test_unix_socket(client, tmp_path):
    s = hs.build()
    obs = ScriptedObserver(s.events)
    with HubbleServer(obs, bind=f"unix://{tmp_path / 'hubble.sock'}") as srv, \
            _follow(srv.address, client) as f:
        assert obs.done.wait(20)
        wait_until(lambda: f.follower.messages == len(s.events), "every message over the socket")
        hs.assert_mapped(f.mapper.drain())
