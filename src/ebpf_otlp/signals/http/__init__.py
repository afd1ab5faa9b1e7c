"""HTTP: one span per request and the request-duration histograms, plaintext and TLS.

Kernel: ``http.bpf.c`` copies the first bytes of every read and write on TCP
connections that carry HTTP/1.x (a raw tracepoint on syscall return), and of every
``SSL_read``/``SSL_write`` (uprobes on each TLS library file, ``tls``).
Here: ring batches are decoded, heads parsed (``parse``), requests paired
with responses per connection (``conn``), and each exchange becomes one span
(batch span path) and one duration measurement (bulk histogram).
"""

from __future__ import annotations

from .signal import HttpSignal

__all__ = ["HttpSignal"]
