"""Live views for people at a terminal: ``ebpf-otlp observe`` (a line per
event) and ``ebpf-otlp top`` (a full-screen table).

Application layer: the views run the agent's own lifecycle (the same signals,
BPF objects and decoders) with a :class:`~.session.LocalExporter` that sends
nothing, and listen to the rows each signal decodes (``Signal.taps``).

- :mod:`.events`: decoded rows -> event dicts with the OTLP attribute names.
- :mod:`.filters`: the command-line filters, parsed and checked.
- :mod:`.session`: the signals running for a view, beside or without an agent.
- :mod:`.observe`, :mod:`.top`: the two views.
"""
