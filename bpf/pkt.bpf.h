/* SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause */
/*
 * The one L2-L4 parser of ebpf-otlp, shared by flows, DNS (TC/XDP, packet
 * data) and drops (skb:kfree_skb, kernel memory). It fills a struct pkt;
 * whatever is unreadable stays zero.
 *
 * Rules (tests/test_flows_testrun.py holds an independent reference):
 *  - Ethernet, then up to two 802.1Q/802.1AD tags still in the frame; a tag
 *    cut short leaves the tag's own type as the ethertype.
 *  - IPv4: version 4 and IHL >= 5, else not IP (family 0). Options skipped.
 *    Later fragments carry no transport header: no ports.
 *  - IPv6: version 6; up to PKT_MAX_IPV6_EXT extension headers walked
 *    (hop-by-hop, routing, destination options, mobility, AH, fragment);
 *    a chain cut short or too long keeps the header it stopped at as proto;
 *    a later fragment keeps the fragment's next header, without ports.
 *  - Addresses are 16 bytes, IPv4 ones IPv4-mapped (::ffff:a.b.c.d): the
 *    one address convention of every record header (flows.h, dns.h,
 *    drops.h, tcp.h).
 *  - Ports (host order) for TCP (14 header bytes needed: ports and flags),
 *    UDP, SCTP and UDP-Lite (4 bytes needed).
 */
#ifndef EBPF_OTLP_PKT_BPF_H
#define EBPF_OTLP_PKT_BPF_H

#include "common.bpf.h"

#define ETH_HLEN 14
#define IPPROTO_HOPOPTS_ 0
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define IPPROTO_ROUTING_ 43
#define IPPROTO_FRAGMENT_ 44
#define IPPROTO_AH_ 51
#define IPPROTO_DSTOPTS_ 60
#define IPPROTO_SCTP_ 132
#define IPPROTO_MH_ 135
#define IPPROTO_UDPLITE_ 136
/* Extension headers walked before giving up. */
#define PKT_MAX_IPV6_EXT 8

/* Headers further into the frame than this are not read (bounds the verifier). */
#define MAX_HDR_OFF 1024

/* Where the bytes come from. */
#define PKT_SKB 0	/* ctx is a struct __sk_buff (TC) */
#define PKT_XDP 1	/* ctx is a struct xdp_md */
#define PKT_KMEM 2	/* ctx is a struct pkt_kmem: kernel memory (tracepoints) */

/* A packet in kernel memory: `len` readable bytes at `base`. */
struct pkt_kmem {
	const unsigned char *base;
	__u32 len;
};

/*
 * Copy `len` header bytes at `off`: straight from the linear data when it
 * is there (cheap: no helper call), else through the helper that also reads
 * paged data. Non-zero when the packet is too short.
 */
static __always_inline int load(void *ctx, const int src, __u32 off, void *to,
				const __u32 len)
{
	void *data, *data_end;

	if (off > MAX_HDR_OFF)
		return -1;
	if (src == PKT_KMEM) {
		struct pkt_kmem *k = ctx;

		if (off + len > k->len)
			return -1;
		return bpf_probe_read_kernel(to, len, k->base + off);
	}
	if (src == PKT_XDP) {
		data = (void *)(long)((struct xdp_md *)ctx)->data;
		data_end = (void *)(long)((struct xdp_md *)ctx)->data_end;
	} else {
		data = (void *)(long)((struct __sk_buff *)ctx)->data;
		data_end = (void *)(long)((struct __sk_buff *)ctx)->data_end;
	}
	if (data + off + len <= data_end) {
		__builtin_memcpy(to, data + off, len);
		return 0;
	}
	if (src == PKT_XDP)
		return bpf_xdp_load_bytes(ctx, off, to, len);
	return bpf_skb_load_bytes(ctx, off, to, len);
}

/* What the parser found. Zeroed by pkt_parse_*() before filling. */
struct pkt {
	__u8 saddr[16];		/* IPv4-mapped for IPv4 */
	__u8 daddr[16];
	__u32 l4_off;		/* offset of the transport header (when has_ports) */
	__u16 ethertype;	/* host order; 0: frame shorter than Ethernet */
	__u16 sport;		/* host order */
	__u16 dport;
	__u8 proto;		/* IP protocol (IPv6: after extension headers) */
	__u8 family;		/* 4, 6; 0 when the IP header was not read */
	__u8 tcp_flags;		/* the TCP flags byte (FIN 0x01 ... CWR 0x80) */
	__u8 tcp_doff;		/* TCP header length in bytes (data offset * 4) */
	__u8 has_ports;		/* the transport header's ports were read */
	__u8 pad;
};

static __always_inline void pkt_v4_mapped(__u8 *dst, const __u8 *src)
{
	__builtin_memset(dst, 0, 10);
	dst[10] = 0xff;
	dst[11] = 0xff;
	__builtin_memcpy(dst + 12, src, 4);
}

static __always_inline void pkt_l4(void *ctx, const int src, __u32 off, struct pkt *p)
{
	__u8 th[14];

	if (p->proto == IPPROTO_TCP_) {
		if (load(ctx, src, off, th, 14))
			return;
		p->tcp_flags = th[13];
		p->tcp_doff = (th[12] >> 4) * 4;
	} else if (p->proto == IPPROTO_UDP_ || p->proto == IPPROTO_SCTP_ ||
		   p->proto == IPPROTO_UDPLITE_) {
		if (load(ctx, src, off, th, 4))
			return;
	} else {
		return;	/* ICMP, ICMPv6 and the rest: no ports */
	}
	p->sport = ((__u16)th[0] << 8) | th[1];
	p->dport = ((__u16)th[2] << 8) | th[3];
	p->l4_off = off;
	p->has_ports = 1;
}

static __always_inline void pkt_ipv4(void *ctx, const int src, __u32 off, struct pkt *p)
{
	__u8 ip[20];
	__u32 ihl;

	if (load(ctx, src, off, ip, 20))
		return;
	ihl = (ip[0] & 0x0f) * 4;
	if ((ip[0] >> 4) != 4 || ihl < 20)
		return;
	p->family = 4;
	p->proto = ip[9];
	pkt_v4_mapped(p->saddr, ip + 12);
	pkt_v4_mapped(p->daddr, ip + 16);
	if (((ip[6] & 0x1f) << 8 | ip[7]) != 0)
		return;	/* later fragment */
	pkt_l4(ctx, src, off + ihl, p);
}

static __always_inline void pkt_ipv6(void *ctx, const int src, __u32 off, struct pkt *p)
{
	__u8 ip[40];
	__u8 ext[4];
	__u8 nh;

	if (load(ctx, src, off, ip, 40))
		return;
	if ((ip[0] >> 4) != 6)
		return;
	p->family = 6;
	__builtin_memcpy(p->saddr, ip + 8, 16);
	__builtin_memcpy(p->daddr, ip + 24, 16);
	nh = ip[6];
	off += 40;
	for (int i = 0; i < PKT_MAX_IPV6_EXT; i++) {
		switch (nh) {
		case IPPROTO_HOPOPTS_:
		case IPPROTO_ROUTING_:
		case IPPROTO_DSTOPTS_:
		case IPPROTO_MH_:
			if (load(ctx, src, off, ext, 2))
				goto stop;
			nh = ext[0];
			off += ((__u32)ext[1] + 1) * 8;
			break;
		case IPPROTO_AH_:
			if (load(ctx, src, off, ext, 2))
				goto stop;
			nh = ext[0];
			off += ((__u32)ext[1] + 2) * 4;
			break;
		case IPPROTO_FRAGMENT_:
			if (load(ctx, src, off, ext, 4))
				goto stop;
			nh = ext[0];
			off += 8;
			if ((((__u16)ext[2] << 8) | ext[3]) & 0xfff8) {
				p->proto = nh;	/* later fragment: no ports */
				return;
			}
			break;
		default:
			p->proto = nh;
			pkt_l4(ctx, src, off, p);
			return;
		}
	}
stop:
	p->proto = nh;
}

/* From the network header at `off`, whose ethertype (host order) is known. */
static __always_inline void pkt_parse_l3(void *ctx, const int src, __u32 off, __u16 ethertype,
					 struct pkt *p)
{
	__builtin_memset(p, 0, sizeof(*p));
	p->ethertype = ethertype;
	if (ethertype == ETH_P_IP)
		pkt_ipv4(ctx, src, off, p);
	else if (ethertype == ETH_P_IPV6)
		pkt_ipv6(ctx, src, off, p);
}

/* From an Ethernet frame at offset 0. */
static __always_inline void pkt_parse_eth(void *ctx, const int src, struct pkt *p)
{
	__u8 eth[ETH_HLEN];
	__u8 tag[4];
	__u32 off = ETH_HLEN;
	__u16 proto;

	if (load(ctx, src, 0, eth, ETH_HLEN)) {
		__builtin_memset(p, 0, sizeof(*p));
		return;	/* runt frame: ethertype 0 */
	}
	proto = ((__u16)eth[12] << 8) | eth[13];
	for (int i = 0; i < 2; i++) {
		if (proto != ETH_P_8021Q && proto != ETH_P_8021AD)
			break;
		if (load(ctx, src, off, tag, 4)) {
			/* tag cut short: counted by the tag's type */
			pkt_parse_l3(ctx, src, off, proto, p);
			return;
		}
		proto = ((__u16)tag[2] << 8) | tag[3];
		off += 4;
	}
	pkt_parse_l3(ctx, src, off, proto, p);
}

#endif /* EBPF_OTLP_PKT_BPF_H */
