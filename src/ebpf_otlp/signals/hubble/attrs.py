"""Attribute tuples of the aggregated Hubble series, built once per series at
drain time from the raw keys the mapper counts under (see ``mapping.Mapper``)."""

from __future__ import annotations

from . import names as N

Attrs = tuple  # tuple[tuple[str, object], ...], in a fixed order per metric

_DIRECTION = {True: "transmit", False: "receive"}


def local_attrs(local: tuple, prefix: str = "") -> Attrs:
    if not local:
        return ()
    ns, pod, wl = local if len(local) == 3 else (local[0], "", local[1])
    out: Attrs = ()
    if ns:
        out += ((prefix + "k8s.namespace.name", ns),)
    if pod:
        out += ((prefix + "k8s.pod.name", pod),)
    return out + tuple((prefix + k, v) for k, v in wl)


def flow_attrs(key: tuple) -> Attrs:
    _, src, sp, dst, dp, transport, ipv, tx, iface, local, node = key[:11]
    a: Attrs = ()
    if src:
        a += (("source.address", src),)
    if sp is not None:
        a += (("source.port", sp),)
    if dst:
        a += (("destination.address", dst),)
    if dp is not None:
        a += (("destination.port", dp),)
    if transport:
        a += (("network.transport", transport),)
    if ipv in N.NET_TYPE:
        a += (("network.type", N.NET_TYPE[ipv]),)
    if tx is not None:
        a += (("network.io.direction", _DIRECTION[tx]),)
    if iface:
        a += (("network.interface.name", iface),)
    a += local_attrs(local)
    if node:
        a += (("k8s.node.name", node),)
    return a


def drop_attrs(key: tuple) -> Attrs:
    return flow_attrs(key) + (("network.drop.reason", key[11]),)


def verdict_attrs(key: tuple) -> Attrs:
    _, verdict, tx, mt, sid, did, sloc, dloc, transport, dp, node = key
    a: Attrs = (("network.policy.verdict", verdict),)
    if tx is not None:
        a += (("network.io.direction", _DIRECTION[tx]),)
    a += (("network.policy.match_type", mt),)
    if sid:
        a += (("source.cilium.identity", sid),)
    a += local_attrs(sloc, "source.")
    if did:
        a += (("destination.cilium.identity", did),)
    a += local_attrs(dloc, "destination.")
    if transport:
        a += (("network.transport", transport),)
    if dp is not None:
        a += (("destination.port", dp),)
    if node:
        a += (("k8s.node.name", node),)
    return a


ATTRS = {N.FLOW_PACKETS: flow_attrs, N.DROPS: drop_attrs, N.VERDICTS: verdict_attrs}
