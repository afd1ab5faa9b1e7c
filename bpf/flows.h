/* SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause */
/* Flow table records, read by both clang and cffi: fixed-width types,
 * explicit padding, no bitfields. Every byte of a key is written by the
 * program (padding included) so equal flows always hash equal. */
#ifndef EBPF_OTLP_FLOWS_H
#define EBPF_OTLP_FLOWS_H

#define FLOW_DIR_RECEIVE 0
#define FLOW_DIR_TRANSMIT 1

/* One flow as the kernel keys it. Addresses are 16 bytes, IPv4 ones
 * IPv4-mapped (::ffff:a.b.c.d). Ports are host order, 0 where the protocol
 * has none, the header is cut short, or the packet is a later fragment.
 * Frames that are not IPv4/IPv6 (or whose IP header is unreadable) keep only
 * ifindex, direction and ethertype, with l3 = 0; ethertype 0 is a frame
 * shorter than an Ethernet header. */
struct flow_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 ifindex;
	__u16 sport;
	__u16 dport;
	__u16 ethertype;	/* host order: 0x0800, 0x86dd, 0x0806 ... */
	__u8 proto;		/* IP protocol number (IPv6: after extension headers) */
	__u8 direction;		/* FLOW_DIR_* */
	__u8 l3;		/* 1: the IP header was read (addresses, proto valid) */
	__u8 pad[3];
};

/* One flow's counters (one slot per CPU in the -DFLOWS_PERCPU variant). */
struct flow_value {
	__u64 packets;		/* skbs (TC) or frames (XDP) */
	__u64 bytes;		/* skb->len / frame length, L2 header included */
	__u64 segments;		/* wire segments: skb gso_segs, at least 1 per packet */
	__u64 first_ns;		/* CLOCK_MONOTONIC (coarse: tick resolution) of the first packet */
	__u64 last_ns;		/* ... and of the last one */
	__u64 tcp_flags;	/* OR of the TCP flags byte (FIN 0x01 ... CWR 0x80); 64 bits: atomic OR */
};

/* Overflow counters, per (ifindex, direction); slot ifindex 0 catches
 * interfaces user space did not pre-create. */
struct flow_ovf_key {
	__u32 ifindex;
	__u8 direction;
	__u8 pad[3];
};

struct flow_ovf_value {
	__u64 packets;		/* packets of flows that found no room */
	__u64 bytes;
	__u64 segments;
	__u64 table_full;	/* inserts refused because the table was full */
	__u64 errors;		/* inserts refused for another reason (ENOMEM ...) */
};

#endif
