/* SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause */
/*
 * DNS capture of the packet object (packet.bpf.c): copy the head of every DNS message (UDP, or TCP segments
 * starting a message) on the configured ports into a ring buffer, from a
 * packet already parsed by pkt.bpf.h. Pairing queries with answers and
 * parsing names is user space's job; here we only find the payload and copy
 * a bounded head.
 */
#ifndef EBPF_OTLP_DNS_BPF_H
#define EBPF_OTLP_DNS_BPF_H

#include "pkt.bpf.h"
#include "dns.h"

#define DNS_FIXED_BYTES __builtin_offsetof(struct dns_event, head)

/* Ports (host order) that mark DNS; the first n_dns_ports are used. */
const volatile __u16 dns_ports[DNS_MAX_PORTS] = { 53 };
const volatile __u32 n_dns_ports = 1;
/* Bytes of each message copied into the record (1..DNS_HEAD_MAX); also
 * sizes the records. */
const volatile __u32 head_bytes = 256;

DEFINE_RINGBUF(dns_events, 4 << 20);
EXPORT_BTF(struct dns_event);

static __always_inline bool dns_is_port(__u16 port)
{
#pragma unroll
	for (int i = 0; i < DNS_MAX_PORTS; i++) {
		if (i >= n_dns_ports)
			break;
		if (dns_ports[i] == port)
			return true;
	}
	return false;
}

/* Copy the DNS message the parsed packet `p` carries, if it is one. */
static __always_inline void dns_capture(struct __sk_buff *skb, const struct pkt *p,
					__u8 direction)
{
	__u32 payload, avail, copy, msg_len;
	struct dns_event *e;
	__be16 be;

	if (!p->has_ports || (!dns_is_port(p->sport) && !dns_is_port(p->dport)))
		return;
	if (p->proto == IPPROTO_UDP_) {
		if (load(skb, PKT_SKB, p->l4_off + 4, &be, sizeof(be)))
			return;
		payload = p->l4_off + 8;
		msg_len = bpf_ntohs(be);
		msg_len = msg_len >= 8 ? msg_len - 8 : 0;
	} else if (p->proto == IPPROTO_TCP_) {
		payload = p->l4_off + p->tcp_doff;
		/* Segments without data (handshake, ACKs, FIN) carry no message;
		 * we only read segments that start one (length prefix first). */
		if (payload + sizeof(be) >= skb->len)
			return;
		if (load(skb, PKT_SKB, payload, &be, sizeof(be)))
			return;
		msg_len = bpf_ntohs(be);
		payload += sizeof(be);
	} else {
		return;
	}

	avail = skb->len > payload ? skb->len - payload : 0;
	copy = avail < msg_len ? avail : msg_len;
	if (copy > head_bytes)
		copy = head_bytes;

	/* Records are the fixed part plus head_bytes (rounded up to 8), not
	 * DNS_HEAD_MAX: with the default 256 that nearly halves the ring space
	 * per message. head_bytes is frozen rodata, so the verifier sees a
	 * constant size. */
	e = RINGBUF_RESERVE(dns_events, DNS_FIXED_BYTES + ((head_bytes + 7) & ~7U));
	if (!e)
		return;
	e->ts_ns = bpf_ktime_get_ns();
	__builtin_memcpy(e->saddr, p->saddr, 16);
	__builtin_memcpy(e->daddr, p->daddr, 16);
	e->ifindex = skb->ifindex;
	e->sport = p->sport;
	e->dport = p->dport;
	e->msg_len = msg_len;
	e->seg_len = avail > 0xffff ? 0xffff : avail;
	e->family = p->family;
	e->proto = p->proto;
	e->direction = direction;
	__builtin_memset(e->pad, 0, sizeof(e->pad));
	/* The verifier needs the length proved within [1, head_bytes]. Older
	 * verifiers (6.1) do not narrow a register after `n == 0`, so test
	 * `n < 1`, and keep clang from rewriting that test back into `n == 0`. */
	{
		__s64 n = copy & 0x3ff;

		asm volatile("" : "+r"(n));
		if (n > head_bytes)
			n = head_bytes;
		if (n < 1 || bpf_skb_load_bytes(skb, payload, e->head, n))
			n = 0;
		e->head_len = n;
	}
	RINGBUF_SUBMIT(dns_events, e);
}

/* Parse a TC packet: `l3` for devices without a link-layer header (tun,
 * WireGuard, IP-in-IP), where the packet starts with IP and skb->protocol
 * says which. */
static __always_inline void pkt_parse_skb(struct __sk_buff *skb, const bool l3, struct pkt *p)
{
	if (l3)
		pkt_parse_l3(skb, PKT_SKB, 0, bpf_ntohs(skb->protocol), p);
	else
		pkt_parse_eth(skb, PKT_SKB, p);
}

#endif /* EBPF_OTLP_DNS_BPF_H */
