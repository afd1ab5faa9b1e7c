"""Command line: ``ebpf-otlp run | hubble | doctor | receive | demo | observe | top``."""

from __future__ import annotations

import logging
import sys
from typing import Callable

import click

from .config import ALL_SIGNALS, AgentConfig, ConfigError, parse_headers

log = logging.getLogger("ebpf_otlp")


def _csv(_ctx: object, _param: object, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _ports(_ctx: object, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        ports = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("expected a comma-separated list of port numbers") from None
    if not ports or any(not 0 < p < 65536 for p in ports):
        raise click.BadParameter("ports must be between 1 and 65535")
    return ports


def _hostport(_ctx: object, _param: object, value: str | None) -> str | None:
    if value is None:
        return None
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise click.BadParameter(f"expected HOST:PORT, not {value!r}")
    return value


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _otlp_options(fn):
    """Where and how often OTLP goes: the same flags for ``run`` and ``hubble``."""
    for opt in reversed((
        click.option("--endpoint", help="OTLP/HTTP base URL [env OTEL_EXPORTER_OTLP_ENDPOINT, "
                     "default http://localhost:4318]."),
        click.option("--header", "headers", multiple=True, metavar="K=V",
                     help="Extra OTLP header (repeatable) [env OTEL_EXPORTER_OTLP_HEADERS]."),
        click.option("--service-name",
                     help="service.name [env OTEL_SERVICE_NAME, default ebpf-otlp]."),
        click.option("--interval", type=click.FloatRange(min=0.1), metavar="SECONDS",
                     help="Export interval [env OTEL_METRIC_EXPORT_INTERVAL (ms), default 10 s]."),
    )):
        fn = opt(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ebpf-otlp")
def main() -> None:
    """eBPF network observability exported as OpenTelemetry (OTLP/HTTP)."""


def run_options(f: Callable) -> Callable:
    """The agent's options, shared by ``run`` and ``config print`` (and, by their
    long names, the configuration file's keys: see :mod:`.configfile`)."""
    decorators = [
        click.option("--iface", "ifaces", multiple=True, metavar="IFACE",
                     help="Interface to watch (repeatable), or a glob ('veth*') matched again "
                     "while running. Needed by flows and dns."),
        click.option("--signals", callback=_csv, metavar="LIST",
                     help=f"Comma-separated signals [default: all of {','.join(ALL_SIGNALS)}]."),
        _otlp_options,
        click.option("--max-flows", type=click.IntRange(min=1, max=1 << 24),
                     help="Flow table size [65536]."),
        click.option("--flow-hook", type=click.Choice(["tc", "xdp"]),
                     help="Ingress hook for flows [tc]."),
        click.option("--tc-mode", type=click.Choice(["auto", "tcx", "tc"]),
                     help="Attach TC programs as TCX links (6.6+) or clsact filters [auto]."),
        click.option("--flow-attributes", callback=_csv, metavar="LIST",
                     help="Flow attributes to keep [all of the flow key]."),
        click.option("--tcp-spans/--no-tcp-spans", default=None,
                     help="One span per TCP connection."),
        click.option("--tcp-attributes", callback=_csv, metavar="LIST",
                     help="Connection attributes to keep [server.address,server.port]."),
        click.option("--tcp-max-sockets", type=click.IntRange(min=16, max=1 << 22),
                     help="Connections the TCP signal tracks at once; more are counted, not "
                          "tracked [65536]."),
        click.option("--dns-ports", callback=_ports, metavar="PORTS", help="DNS ports [53]."),
        click.option("--dns-names/--no-dns-names", default=None,
                     help="Keep dns.question.name on metrics (cardinality) [off]."),
        click.option("--dns-timeout", type=click.FloatRange(min=0.01), metavar="SECONDS",
                     help="Unanswered DNS queries become timeouts after this [5]."),
        click.option("--dns-head-bytes", type=click.IntRange(min=64, max=512),
                     help="Bytes of each DNS message copied from the kernel [256]."),
        click.option("--http-head-bytes", type=click.IntRange(min=16, max=1024),
                     help="Bytes of each HTTP read/write copied from the kernel [256]."),
        click.option("--http-capture-query/--no-http-capture-query", default=None,
                     help="Export url.query (may hold secrets) [off]."),
        click.option("--http-capture-header", "http_capture_headers", multiple=True, metavar="NAME",
                     help="Export this request header's value as http.request.header.NAME "
                          "(repeatable) [none]."),
        click.option("--http-attributes", callback=_csv, metavar="LIST",
                     help="Address attributes kept on HTTP duration histograms "
                          "[server.address,server.port]."),
        click.option("--http-route-pattern", "http_route_patterns", multiple=True, metavar="REGEX",
                     help="Path segments matching REGEX become * in routes (repeatable), besides "
                          "numbers, UUIDs and hex ids."),
        click.option("--http-span-sample", type=click.FloatRange(min=0.0, max=1.0),
                     metavar="RATIO",
                     help="Export this ratio of HTTP spans (parentbased_traceidratio: a "
                          "request whose traceparent is sampled is always kept); histograms "
                          "count every request. Over OTEL_TRACES_SAMPLER[_ARG] "
                          "[parentbased_always_on]."),
        click.option("--http-capture", type=click.Choice(["auto", "socket", "syscall"]),
                     help="Plaintext HTTP from the socket tracepoints (kernel 6.3+, no cost to "
                          "other syscalls) or from every syscall's exit [auto: socket where "
                          "the kernel has them]."),
        click.option("--http-tls/--no-http-tls", default=None,
                     help="Trace TLS through uprobes on the SSL library [on]."),
        click.option("--tls-relocate/--no-tls-relocate", default=None,
                     help="Put the SSL probes where the kernel emulates the probed instruction "
                          "when the library's code allows it (README: TLS probe placement) [on]."),
        click.option("--tls-lib", "tls_libs", multiple=True, metavar="PATH",
                     help="Binary linking OpenSSL statically to trace TLS in (repeatable); "
                          "libssl.so files that processes map are found by themselves."),
        click.option("--drop-location/--no-drop-location", default=None,
                     help="Add network.drop.location (kernel function) to drops."),
        click.option("--drop-exclude-not-specified/--no-drop-exclude-not-specified", default=None,
                     help="Ignore frees with reason NOT_SPECIFIED."),
        click.option("--drop-logs/--no-drop-logs", default=None,
                     help="An OTLP log record for the first drop of each (reason, flow)."),
        click.option("--max-drops", type=click.IntRange(min=1, max=1 << 22),
                     help="Distinct (reason, flow) drop entries per interval [16384]."),
        click.option("--drop-reasons", callback=_csv, metavar="LIST",
                     help="Count only these drop reasons (e.g. NETFILTER_DROP,NO_SOCKET) [all]."),
        click.option("--bpf-stats/--no-bpf-stats", default=None,
                     help="Kernel run-time statistics of our programs; host-wide while on, "
                          "~85 ns per BPF program run [off]."),
        click.option("--cgroup", "cgroup_path", metavar="PATH",
                     help="cgroup v2 directory for sock_ops [where cgroup2 is mounted]."),
        click.option("--attribution",
                     type=click.Choice(["none", "namespace", "container", "process"]),
                     help="Pod/container resources: none, namespace (pod), container (pod and "
                     "container), process (also pid on metrics) [container]."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False), metavar="FILE",
                     help="YAML configuration file; keys are these options' long names."),
        click.option("--strict/--no-strict", default=None,
                     help="A signal that cannot load or attach stops the agent [off: it is "
                     "switched off with one log line]."),
        click.option("--export-queue-bytes", type=click.IntRange(min=0), metavar="BYTES",
                     help="Undelivered OTLP requests kept per signal for retry, and "
                     "(half of it) spans and log records waiting to be sent; beyond, "
                     "the oldest requests or the newest items are dropped and counted "
                     "[16777216]."),
        click.option("--health-listen", metavar="HOST:PORT", callback=_hostport,
                     help="Serve /healthz, /readyz and /status here [off]."),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


@main.command()
@run_options
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.pass_context
def run(ctx: click.Context, verbose: int, **params: object) -> None:
    """Run the agent until SIGINT/SIGTERM (SIGHUP reloads --config)."""
    _setup_logging(verbose)
    from .configfile import resolve

    try:
        cfg, strict, _ = resolve(ctx, params)
    except ConfigError as e:
        click.echo(f"ebpf-otlp: {e}", err=True)
        sys.exit(2)

    try:
        from .agent import Agent, NothingToRun
        from .capabilities import MissingCapabilities
        from .platform.libbpf import BpfError
        from .platform.mounts import MountError
    except ImportError as e:  # libbpf.so.1 missing or too old: say what to install
        click.echo(f"ebpf-otlp: {e}", err=True)
        sys.exit(1)

    try:
        agent = Agent(cfg, strict=strict)
    except ConfigError as e:
        click.echo(f"ebpf-otlp: {e}", err=True)
        sys.exit(2)
    if cfg.config_file:
        agent.reload_config = lambda: resolve(ctx, params)[0]
    try:
        status = agent.run_until_signalled()
    except ConfigError as e:
        click.echo(f"ebpf-otlp: {e}", err=True)
        sys.exit(2)
    except (BpfError, MountError, FileNotFoundError, MissingCapabilities, NothingToRun) as e:
        click.echo(f"ebpf-otlp: {e}", err=True)
        sys.exit(1)
    sys.exit(status)


@main.group()
def config() -> None:
    """The agent's configuration."""


@config.command("print")
@run_options
@click.pass_context
def config_print(ctx: click.Context, **params: object) -> None:
    """The effective configuration (as a --config file) and each value's source."""
    from .configfile import effective, resolve

    try:
        cfg, strict, sources = resolve(ctx, params)
    except ConfigError as e:
        click.echo(f"ebpf-otlp: {e}", err=True)
        sys.exit(2)
    click.echo(effective(cfg, strict, sources, ctx.command), nl=False)


@main.command()
@click.option("--listen", default="127.0.0.1:4318", show_default=True, metavar="HOST:PORT")
@click.option("--output", type=click.Path(dir_okay=False, writable=True),
              help="Write JSON lines here instead of printing readable lines.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=32 << 20,
              show_default=True, help="Largest request body accepted (413 beyond).")
@click.option("--max-decoded-bytes", type=click.IntRange(min=1), default=64 << 20,
              show_default=True, help="Largest body after gzip/deflate decoding (413 beyond).")
def receive(listen: str, output: str | None, max_body_bytes: int,
            max_decoded_bytes: int) -> None:
    """A small OTLP/HTTP receiver that prints what arrives."""
    from .receiver import Receiver, json_sink, text_sink

    host, _, port = listen.rpartition(":")
    try:
        port_n = int(port)
    except ValueError:
        raise click.BadParameter("expected HOST:PORT", param_hint="--listen") from None
    out = open(output, "a") if output else sys.stdout  # noqa: SIM115 (lives as long as the server)
    sink = json_sink(out) if output else text_sink(out)
    try:
        rx = Receiver(host.strip("[]") or "127.0.0.1", port_n, sink=sink,
                      max_body_bytes=max_body_bytes, max_decoded_bytes=max_decoded_bytes)
    except OSError as e:
        click.echo(f"ebpf-otlp receive: cannot listen on {listen}: {e.strerror}", err=True)
        sys.exit(2)
    click.echo(f"receiving OTLP/HTTP on {host}:{rx.port}", err=True)
    import signal as _signal

    _signal.signal(_signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        rx.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        click.echo(f"received {rx.requests} requests, {rx.bad_requests} bad", err=True)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json: bool) -> None:
    """What this host supports, and which signals can run."""
    from .doctor import run_doctor

    sys.exit(run_doctor(as_json))


@main.command()
@click.option("--seconds", default=12.0, show_default=True, help="How long traffic runs.")
def demo(seconds: float) -> None:
    """Namespaces, traffic, agent and receiver on this machine; prints a summary."""
    from .demo import run_demo

    sys.exit(run_demo(seconds))


@main.command()
@click.option("--server", metavar="ADDR",
              help="Hubble Relay or a node's Hubble server: host:port, tls://host:port or "
              "unix:///path.")
@click.option("--file", "file", metavar="PATH", help="Follow a Hubble export file (JSON lines).")
@click.option("--tls", is_flag=True, default=False, help="Use TLS to reach the server.")
@click.option("--tls-ca-cert-files", callback=_csv, metavar="FILES",
              help="CA certificates (comma-separated) [system roots].")
@click.option("--tls-client-cert-file", metavar="FILE", help="Client certificate (mTLS).")
@click.option("--tls-client-key-file", metavar="FILE", help="Client key (mTLS).")
@click.option("--tls-server-name", metavar="NAME", help="Name the server's certificate carries.")
@click.option("--hubble-client", type=click.Choice(["h2", "grpcio"]), default="h2",
              show_default=True, help="gRPC client for --server (README: Hubble bridge).")
@_otlp_options
@click.option("--max-series", type=click.IntRange(min=1, max=1 << 22), default=65536,
              show_default=True, help="Series per metric before the overflow series.")
@click.option("--max-pending", type=click.IntRange(min=1, max=1 << 22), default=65536,
              show_default=True, help="L7 requests waiting for their response.")
@click.option("--l7-timeout", type=click.FloatRange(min=0.01), default=30.0, metavar="SECONDS",
              show_default=True, help="Unanswered L7 requests become timeouts after this.")
@click.option("--dns-names/--no-dns-names", default=False,
              help="Keep dns.question.name on dns.lookup.duration (cardinality) [off].")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def hubble(server: str | None, file: str | None, tls: bool,
           tls_ca_cert_files: tuple[str, ...] | None, tls_client_cert_file: str | None,
           tls_client_key_file: str | None, tls_server_name: str | None, hubble_client: str,
           endpoint: str | None, headers: tuple[str, ...], service_name: str | None,
           interval: float | None, max_series: int, max_pending: int, l7_timeout: float,
           dns_names: bool, verbose: int) -> None:
    """Bridge Cilium's Hubble (--server ADDR or --file PATH) into OTLP until SIGINT/SIGTERM."""
    _setup_logging(verbose)
    from .signals import hubble as hb

    try:
        cfg = AgentConfig(ifaces=[])
        if endpoint:
            cfg.endpoint = endpoint
        if service_name:
            cfg.service_name = service_name
        if interval is not None:
            cfg.interval_s = interval
        if headers:
            try:
                cfg.headers.update(parse_headers(",".join(headers)))
            except ValueError as e:
                raise ConfigError(f"--header: {e}") from None
        hb.run(hb.HubbleOptions(
            server=server, file=file, tls=tls, tls_ca_cert_files=tls_ca_cert_files or (),
            tls_client_cert_file=tls_client_cert_file, tls_client_key_file=tls_client_key_file,
            tls_server_name=tls_server_name, client=hubble_client, max_series=max_series,
            max_pending=max_pending, l7_timeout_s=l7_timeout, dns_names=dns_names), cfg)
    except ConfigError as e:
        click.echo(f"ebpf-otlp: {e}", err=True)
        sys.exit(2)


# --- live views -------------------------------------------------------------------------
_FILTERS = (
    ("--signal", "signal", "SIGNAL", "Only these signals: tcp, dns, drops, flows, http "
     "(flows and http only when named)."),
    ("--ip", "ip", "CIDR", "Either end in this network."),
    ("--from-ip", "from_ip", "CIDR", "Source (client) in this network."),
    ("--to-ip", "to_ip", "CIDR", "Destination (server) in this network."),
    ("--port", "port", "PORT", "Either end's port."),
    ("--protocol", "protocol", "NAME", "network.transport: tcp, udp, icmp, ..."),
    ("--drop-reason", "drop_reason", "REASON", "Kernel drop reason, e.g. NO_SOCKET."),
    ("--dns-name", "dns_name", "GLOB", "DNS question name, e.g. '*.example.com'."),
    ("--pid", "pid", "PID", "Process id (TCP)."),
    ("--comm", "comm", "NAME", "Process name (TCP)."),
)


def _view_options(fn):  # noqa: ANN001, ANN202 (a click decorator)
    for flag, dest, metavar, text in reversed(_FILTERS):
        fn = click.option(flag, dest, multiple=True, metavar=metavar,
                          help=text + " Repeatable or comma-separated.")(fn)
    fn = click.option("--iface", "ifaces", multiple=True, metavar="IFACE",
                      help="Interface for flows and DNS (repeatable); without one, "
                      "TCP and drops only.")(fn)
    fn = click.option("--all-drops", is_flag=True,
                      help="Also frees the kernel gives no reason for (NOT_SPECIFIED).")(fn)
    fn = click.option("--interval", type=click.FloatRange(min=0.2), default=1.0,
                      show_default=True, metavar="SECONDS",
                      help="How often drops and flows are drained from the kernel.")(fn)
    return click.option("-v", "--verbose", count=True, help="More logging.")(fn)


def _view_session(ifaces: tuple[str, ...], interval: float, verbose: int,
                  filters: dict[str, tuple[str, ...]], want: tuple[str, ...],
                  flows_top: int = 5000, rtt: bool = True):
    filters_all = bool(filters.pop("all_drops")) or any(
        "NOT_SPECIFIED" in r.upper() for r in filters.get("drop_reason", ()))
    """A started-up view: filters checked (one line and exit 2 when bad), the
    signals chosen, the agent built with a local exporter."""
    logging.basicConfig(level=logging.WARNING - 10 * verbose,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:  # its start-up line names an endpoint a view never uses
        logging.getLogger("ebpf_otlp.agent").setLevel(logging.ERROR)
    from .views.filters import FilterError, parse

    known = None
    if filters.get("drop_reason"):
        try:
            from .signals.drops.reasons import DropReasons

            known = DropReasons.from_kernel().names.values() or None
        except Exception:  # no BTF: names are checked against nothing
            known = None
    try:
        flt = parse(signals=filters.pop("signal"), known_reasons=known, **filters)
        wanted = flt.implied_signals() & set(want)
        if flt.signals and not ifaces and flt.signals & {"dns", "flows"}:
            raise FilterError("dns and flows need --iface")
        if not ifaces:
            wanted -= {"dns", "flows"}
        if not wanted:
            raise FilterError("these filters leave no signal to watch")
        cfg = AgentConfig(ifaces=list(ifaces))
        from .signals import available

        cfg.signals = tuple(s for s in available() if s in wanted)
        cfg.interval_s = interval
        cfg.bpf_stats = False
        cfg.drop_location = True
        # Frees without a reason (NOT_SPECIFIED) are mostly not drops a person looks for
        # (segments a TIME_WAIT socket absorbed, multicast nobody joined).
        cfg.drop_exclude_not_specified = not filters_all
    except (FilterError, ConfigError) as e:
        click.echo(f"ebpf-otlp: {e}", err=True)
        sys.exit(2)
    try:
        from .agent import Agent
        from .views.session import Session

        accept = flt if rtt else (lambda e: e["event"] != "rtt" and flt(e))
        return Session(Agent, cfg, accept=accept, flows_top=flows_top)
    except ImportError as e:  # libbpf.so.1 missing or too old: say what to install
        click.echo(f"ebpf-otlp: {e}", err=True)
        sys.exit(1)
    except ConfigError as e:
        click.echo(f"ebpf-otlp: {e}", err=True)
        sys.exit(2)


def _run_view(fn, *args: object) -> None:  # noqa: ANN001
    from .platform.libbpf import BpfError
    from .platform.mounts import MountError

    try:
        code = fn(*args)
    except ConfigError as e:
        click.echo(f"ebpf-otlp: {e}", err=True)
        sys.exit(2)
    except (BpfError, MountError, FileNotFoundError) as e:
        click.echo(f"ebpf-otlp: {e}", err=True)
        sys.exit(1)
    sys.exit(code)


@main.command()
@_view_options
@click.option("-o", "--output", "fmt", type=click.Choice(["line", "json"]), default="line",
              show_default=True, help="Readable lines, or one JSON object per line.")
@click.option("--flows", "flows", is_flag=True, help="Also print the top flows every interval.")
@click.option("--flows-top", type=click.IntRange(min=1), default=10, show_default=True,
              metavar="N", help="How many flows --flows prints per interval.")
@click.option("--duration", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Stop after this long [until Ctrl-C].")
def observe(ifaces: tuple[str, ...], interval: float, verbose: int, fmt: str, flows: bool,
            flows_top: int, duration: float | None, **filters: tuple[str, ...]) -> None:
    """One line per event (TCP, DNS, drops; HTTP, and flows per interval, when asked)."""
    asked = {s.strip() for v in filters["signal"] for s in v.split(",")}
    # flows and HTTP only when asked for, as for `run` (HTTP traces every
    # process's socket reads and writes while it runs)
    want = ("tcp", "dns", "drops") + (("flows",) if flows or "flows" in asked else ()) + (
        ("http",) if "http" in asked else ())
    # RTT samples feed top's table; observe prints the RTT on each close line
    session = _view_session(ifaces, interval, verbose, filters, want, rtt=False)
    from .views.observe import run_observe

    _run_view(run_observe, session, fmt == "json", flows_top, duration)


@main.command()
@_view_options
@click.option("--rows", type=click.IntRange(min=1), metavar="N",
              help="Rows per table [what fits; 10 when not a terminal].")
@click.option("--duration", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Stop after this long [until q or Ctrl-C].")
def top(ifaces: tuple[str, ...], interval: float, verbose: int, rows: int | None,
        duration: float | None, **filters: tuple[str, ...]) -> None:
    """A live full-screen table: flows, TCP peers, DNS names, drops (q quits)."""
    session = _view_session(ifaces, interval, verbose, filters, ALL_SIGNALS)
    from .views.top import run_top

    _run_view(run_top, session, rows, duration)


if __name__ == "__main__":
    main()
