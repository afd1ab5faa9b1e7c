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
	__u64 first_ns;		/* CLOCK_MONOTONIC (coarse: tick resolution) of the packet that
				 * inserted the flow. No last-seen time: reading the clock on
				 * every packet cost ~20 ns of ~90 (bench/pktcost.py), and the
				 * table drained per interval says the flow was seen in it. */
	__u64 tcp_flags;	/* OR of the TCP flags byte (FIN 0x01 ... CWR 0x80); 64 bits: atomic OR */
};

/*
 * Per-CPU front of the shared table: FLOWS_FRONT_SLOTS recent flows per CPU
 * and per table (slot = a cheap hash of the key). Consecutive packets of a
 * flow add to its front slot with plain adds, no hash lookup and no atomics;
 * a flow that takes the slot spills the previous one into the shared table.
 * User space drains a table's front slots with the table (flows_agg).
 * The array holds 2 * FLOWS_FRONT_SLOTS entries: table 0's slots first.
 */
#define FLOWS_FRONT_SLOTS 8

struct flow_front {
	struct flow_key key;
	struct flow_value value;	/* value.packets == 0: the slot is empty */
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
	__u64 table_full;	/* inserts (of one or more packets) refused: table full */
	__u64 errors;		/* inserts refused for another reason (ENOMEM ...) */
};

#endif
