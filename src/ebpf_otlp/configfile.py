"""The configuration file (``--config FILE``, YAML) and where each value came from.

One schema: a file key is a ``run`` flag's long name without the dashes
(``max-flows: 4096`` is ``--max-flows 4096``), checked by the same click
type and callback as the flag, so a value is valid in the file exactly when
it is valid on the command line. Lists may be YAML lists or comma-separated
strings; ``header`` may be a mapping. Unknown keys are refused.

Precedence: command-line flags, then the file, then the ``OTEL_*``
environment variables, then defaults.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import click
import yaml

from .config import ALL_SIGNALS, FLOW_ATTRIBUTES, AgentConfig, ConfigError
from .otlp.settings import DEFAULT_ENDPOINT, parse_headers

# run's parameters that are not configuration
NOT_IN_FILE = frozenset(("config_file", "verbose"))


def file_keys(command: click.Command) -> dict[str, click.Option]:
    """File key -> the ``run`` option it stands for."""
    out = {}
    for p in command.params:
        if isinstance(p, click.Option) and p.name not in NOT_IN_FILE:
            long = max(p.opts, key=len)
            out[long.lstrip("-")] = p
    return out


def _as_flag_value(p: click.Option, key: str, value: Any) -> Any:
    """The YAML value in the shape the option's type and callback expect."""
    if p.multiple:
        if isinstance(value, dict) and key == "header":
            value = [f"{k}={v}" for k, v in value.items()]
        if not isinstance(value, list):
            value = [value]
        return tuple(str(v) if not isinstance(v, (bool, int, float)) else v for v in value)
    if isinstance(value, list):  # comma-separated options (signals, dns-ports, ...)
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        raise ConfigError(f"expected a single value, not {value!r}")
    if p.is_flag and not isinstance(value, bool):
        raise ConfigError(f"expected true or false, not {value!r}")
    return value


def load(path: str | Path, command: click.Command, ctx: click.Context) -> dict[str, Any]:
    """Parameter name -> checked value, from the YAML file at ``path``.

    Every problem raises :class:`ConfigError` with one line naming the file,
    the key, the bad value and what is allowed.
    """
    where = f"config {path}"
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}:{at} not valid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values at the top level")
    keys = file_keys(command)
    out: dict[str, Any] = {}
    for key, value in data.items():
        p = keys.get(str(key))
        if p is None:
            near = difflib.get_close_matches(str(key), keys, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(f"{where}: unknown key {key!r}; {hint}known keys: "
                              f"{', '.join(sorted(keys))}")
        if value is None:  # "key: null" (or empty) means the default
            continue
        try:
            raw = _as_flag_value(p, str(key), value)
            out[p.name] = p.process_value(ctx, raw)
        except ConfigError as e:
            raise ConfigError(f"{where}: key {key!r}: {e}") from None
        except click.BadParameter as e:
            raise ConfigError(f"{where}: key {key!r}: bad value {value!r}: "
                              f"{e.message}") from None
    return out


# Environment variables the agent reads (the OpenTelemetry SDK reads
# OTEL_RESOURCE_ATTRIBUTES); the deployment files may set only these.
_OTLP_VARS = ("ENDPOINT", "HEADERS", "TIMEOUT", "COMPRESSION", "CERTIFICATE",
              "CLIENT_CERTIFICATE", "CLIENT_KEY")
ENV_VARS = frozenset(
    ["OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_METRIC_EXPORT_INTERVAL",
     "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "OTEL_TRACES_SAMPLER",
     "OTEL_TRACES_SAMPLER_ARG"]
    + [f"OTEL_EXPORTER_OTLP_{v}" for v in _OTLP_VARS]
    + [f"OTEL_EXPORTER_OTLP_{k}_{v}" for k in ("METRICS", "TRACES", "LOGS") for v in _OTLP_VARS])

# run's parameter name -> AgentConfig attribute, where they differ
_ATTR = {"ifaces": "ifaces", "headers": "headers", "interval": "interval_s",
         "dns_timeout": "dns_timeout_s"}
# where a value not given as a flag or in the file comes from
_ENV = {"service_name": "OTEL_SERVICE_NAME", "interval": "OTEL_METRIC_EXPORT_INTERVAL",
        "endpoint": "OTEL_EXPORTER_OTLP_ENDPOINT", "headers": "OTEL_EXPORTER_OTLP_HEADERS",
        "http_span_sample": "OTEL_TRACES_SAMPLER"}


def resolve(ctx: click.Context, params: dict[str, Any],
            ) -> tuple[AgentConfig, bool, dict[str, str]]:
    """The effective configuration from ``run``'s parameters (flags), the file they
    name and the environment: (config, strict, parameter name -> source).

    Every bad value raises :class:`ConfigError` (one line, exit status 2).
    """
    from . import signals as known

    params = dict(params)
    sources: dict[str, str] = {}
    from_file: dict[str, Any] = {}
    path = params.pop("config_file", None)
    if path:
        from_file = load(path, ctx.command, ctx)
    for name in list(params):
        given = ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        if given:
            long = max(next(p for p in ctx.command.params if p.name == name).opts, key=len)
            sources[name] = f"flag {long}"
        elif name in from_file:
            params[name] = from_file[name]
            sources[name] = f"file {path}"
        elif name in _ENV and os.environ.get(_ENV[name], "").strip():
            sources[name] = f"env {_ENV[name]}"
        else:
            sources[name] = "default"

    cfg = AgentConfig(ifaces=list(params.pop("ifaces") or ()))
    signals = params.pop("signals")
    if signals is not None:
        for s in signals:
            if s not in known.available():
                raise ConfigError(f"{_where(sources, 'signals')}: unknown signal {s!r}; "
                                  f"known: {', '.join(known.available())}")
        cfg.signals = tuple(signals)
    elif not cfg.ifaces:
        cfg.signals = tuple(s for s in ALL_SIGNALS if s not in ("flows", "dns"))
        sources["signals"] = "default (no interface: flows and dns off)"
    headers = params.pop("headers") or ()
    if headers:
        try:
            cfg.headers.update(parse_headers(",".join(headers), _where(sources, "headers")))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    fa = params.pop("flow_attributes")
    if fa is not None:
        bad = set(fa) - set(FLOW_ATTRIBUTES) - {"network.tcp.flags"}
        if bad:
            raise ConfigError(f"{_where(sources, 'flow_attributes')}: unknown attributes "
                              f"{sorted(bad)}; choose from {', '.join(FLOW_ATTRIBUTES)}, "
                              "network.tcp.flags")
        cfg.flow_attributes = tuple(fa)
    strict = bool(params.pop("strict"))
    for p in ctx.command.params:  # a repeatable flag not given: the default, not ()
        if getattr(p, "multiple", False) and p.name in params and not params[p.name]:
            params[p.name] = None
    for key, value in params.items():
        if value is not None:
            setattr(cfg, _ATTR.get(key, key), value)
    cfg.config_file = path or None
    if "http" in cfg.signals:
        cfg.http_sampler()  # a bad OTEL_TRACES_SAMPLER[_ARG]: one line and exit 2, here
    return cfg, strict, sources


def _where(sources: dict[str, str], name: str) -> str:
    src = sources.get(name, "")
    if src.startswith("flag "):
        return src[5:]
    if src.startswith("file "):
        key = {"ifaces": "iface", "headers": "header", "cgroup_path": "cgroup"}.get(name, name)
        return f"config {src[5:]}: key {key.replace('_', '-')!r}"
    return src.removeprefix("env ") if src.startswith("env ") else name


def effective(cfg: AgentConfig, strict: bool, sources: dict[str, str],
              command: click.Command) -> str:
    """The effective configuration as a YAML configuration file, each line
    commented with where its value came from (header values redacted)."""
    lines = []
    for key, p in file_keys(command).items():
        name = p.name
        if name == "strict":
            value: Any = strict
        elif name == "headers":
            value = {k: "<redacted>" for k in cfg.headers}
            env_h = os.environ.get("OTEL_EXPORTER_OTLP_HEADERS", "").strip()
            if not value and env_h:
                value = {k: "<redacted>" for k in parse_headers(env_h)}
        elif name == "endpoint":
            value = cfg.endpoint or (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
                                     or DEFAULT_ENDPOINT)
        else:
            value = getattr(cfg, _ATTR.get(name, name), None)
        if isinstance(value, tuple):
            value = list(value)
        text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16)
        text = text.strip().removesuffix("...").strip()
        lines.append(f"{key}: {text}  # {sources.get(name, 'default')}")
    return "\n".join(lines) + "\n"
