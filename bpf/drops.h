/* SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause */
/* Records of the drops object: read by both clang and cffi, so only
 * fixed-width types, explicit padding and no bitfields. */
#ifndef EBPF_OTLP_DROPS_H
#define EBPF_OTLP_DROPS_H

/* The reason recorded when the kernel's tracepoint has no `reason` field
 * (before 5.17): user space names it UNKNOWN. */
#define DROP_REASON_UNKNOWN 0xFFFFFFFF

/* The in-kernel reason filter (rodata `reason_bits`): one bit per enum
 * skb_drop_reason value, 64 per word; values past the last word never pass
 * when the filter is on. */
#define DROP_REASON_WORDS 8

/* Slots of the per-CPU `drop_stats` array. */
#define DROP_STAT_TABLE_FULL 0     /* drops that found the flow table full */
#define DROP_STAT_OVERFLOW_LOST 1  /* ... and whose reason the overflow table could not hold */
#define DROP_STAT_EVENTS 2         /* drops counted (after the consumed/not-specified filter) */
#define DROP_STAT_SLOTS 4

/* One aggregation key: (reason, location, flow, interface). Zeroed before
 * filling: the padding is hashed too. */
struct drop_key {
	__u32 reason;    /* enum skb_drop_reason value */
	__u32 ifindex;   /* skb->dev, else skb->skb_iif; 0 unknown */
	__u64 location;  /* kernel text address of the drop; 0 unless asked for */
	__u8 saddr[16];  /* IPv4-mapped for IPv4 (::ffff:a.b.c.d) */
	__u8 daddr[16];
	__u16 sport;     /* host order; 0 when not TCP/UDP/SCTP */
	__u16 dport;
	__u16 l3proto;   /* ethertype, host order (skb->protocol) */
	__u8 l4proto;    /* IPPROTO_* */
	__u8 family;     /* 4, 6, or 0 when the packet is not IP */
	__u32 netns;     /* inode of the device's (or socket's) netns; 0 unknown */
	__u32 pad;
	__u8 ifname[16]; /* dev->name, read in the kernel: right whatever the netns */
};

struct drop_value {
	__u64 packets;
	__u64 first_ns;  /* CLOCK_MONOTONIC of the first drop this interval */
};

#endif
