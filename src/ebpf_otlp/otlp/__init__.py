"""Everything OTLP: encoding and sending, and nothing else of ours.

- :mod:`.settings`: endpoints, headers, timeout, compression, temporality,
  resolved once (explicit values over ``OTEL_*`` variables).
- :mod:`.sender`: the one HTTP path per OTLP signal (retries, gzip, counting).
- :mod:`.exporter`: the seam signals use (:class:`Exporter`): SDK
  instruments for low-volume data, :meth:`Exporter.histogram` (bulk
  histograms), :meth:`Exporter.submit_spans` (the batch span path),
  :meth:`Exporter.send_sums` (sums from arrays), ``logs``.
- :mod:`.wire`, :mod:`.sums`, :mod:`.histogram`, :mod:`.spans`, :mod:`.logs`:
  the encoders; :mod:`.semconv`: shared attribute values; :mod:`.sdk`: the
  SDK's meter provider wired to our sender.

Imports nothing from ``platform`` or ``signals``.
"""

from .exporter import Exporter
from .semconv import DURATION_BUCKETS, SCOPE
from .settings import ExportSettings, SettingsError
from .spans import SPAN_KIND_CLIENT, SPAN_KIND_SERVER, SpanGroup, SpanRecord

__all__ = ["DURATION_BUCKETS", "SCOPE", "SPAN_KIND_CLIENT", "SPAN_KIND_SERVER", "ExportSettings",
           "Exporter", "SettingsError", "SpanGroup", "SpanRecord"]
