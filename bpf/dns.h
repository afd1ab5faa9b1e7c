/* SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause */
/* Records of the DNS object, read by clang and by cffi (ebpf_otlp.layout):
 * fixed-width types, explicit padding, no bitfields, no includes. */
#ifndef EBPF_OTLP_DNS_H
#define EBPF_OTLP_DNS_H

/* Upper bound of the bytes copied per message. A record is the fields
 * before head[] plus the rodata `head_bytes` (<= this) rounded up to 8:
 * every record of one loaded object has the same size, so user space decodes
 * a whole batch as one numpy array (ebpf_otlp.dns_decode.event_dtype). */
#define DNS_HEAD_MAX 512
/* How many ports the programs compare against (rodata `dns_ports`). */
#define DNS_MAX_PORTS 8

/* Same values as FLOW_DIR_RECEIVE / FLOW_DIR_TRANSMIT (packet.bpf.c). */
#define DNS_DIR_INGRESS 0
#define DNS_DIR_EGRESS 1

/* One DNS message seen on the wire (UDP payload, or a TCP segment that
 * starts with the 2-byte length prefix, which is not part of head[]). */
struct dns_event {
	__u64 ts_ns;		/* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u8 saddr[16];		/* IPv4-mapped for IPv4 (::ffff:a.b.c.d) */
	__u8 daddr[16];
	__u32 ifindex;
	__u16 sport;		/* host byte order */
	__u16 dport;
	__u16 msg_len;		/* whole message: UDP length - 8, or the TCP prefix */
	__u16 head_len;		/* valid bytes in head[] */
	__u16 seg_len;		/* bytes of the message in this packet (capped) */
	__u8 family;		/* 4 or 6 */
	__u8 proto;		/* 6 (TCP) or 17 (UDP) */
	__u8 direction;		/* DNS_DIR_* */
	__u8 pad[7];
	__u8 head[DNS_HEAD_MAX];	/* starts at the DNS header */
};

/* getaddrinfo() calls, from libc uprobes: what applications waited for,
 * including answers from caches and /etc/hosts that never reach the wire. */
#define DNS_GAI_NAME 64
/* gai_untracked slots */
#define DNS_GAI_TABLE_FULL 0
#define DNS_GAI_NO_START 1

struct gai_event {
	__u64 ts_ns;		/* call entry, CLOCK_MONOTONIC */
	__u64 duration_ns;
	__u32 pid;
	__u32 tid;
	__s32 ret;		/* 0, or an EAI_* code (negative) */
	__u8 comm[16];
	__u8 name[DNS_GAI_NAME];	/* the node argument, NUL-terminated, cut */
	__u8 pad[4];
	__u64 cgroup_id;	/* the caller's cgroup v2 id */
};

#endif
