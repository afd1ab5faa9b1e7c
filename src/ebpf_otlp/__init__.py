"""ebpf-otlp: eBPF network observability exported as OpenTelemetry."""

__version__ = "0.1.0"
