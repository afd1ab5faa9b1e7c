/* SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause */
/*
 * Flow accounting, shared by the flows object (flows.bpf.c) and the
 * one-program-per-hook packet object (packet.bpf.c).
 *
 * One hash table shared by all CPUs with atomic adds, not a per-CPU hash:
 * kernel memory does not multiply by the number of possible CPUs (README
 * "Kernel memory"; a per-CPU table of the default 65,536 flows took
 * 6.3 MB per possible CPU, ~1.6 GB at 256). The cost per packet is measured
 * by bench/pktcost.py against the per-CPU variant (-DFLOWS_PERCPU).
 *
 * Double buffering: there are two tables and `flows_active` says which one
 * the programs write. User space flips it, waits a grace period (longer
 * than any program run) and only then drains the table nobody writes any
 * more. Draining a table that programs still write would lose the
 * increments made between the batch copy and the delete, and with
 * preallocated elements could even add them to a recycled element of
 * another flow.
 */
#ifndef EBPF_OTLP_FLOWS_BPF_H
#define EBPF_OTLP_FLOWS_BPF_H

#include "pkt.bpf.h"
#include "flows.h"

/* Which table the programs write: 0 -> flows_a, 1 -> flows_b. */
__u32 flows_active = 0;

#ifdef FLOWS_PERCPU
#define FLOWS_TABLE_TYPE BPF_MAP_TYPE_PERCPU_HASH
#define FLOWS_ADD(p, n) (*(p) += (n))
#else
#define FLOWS_TABLE_TYPE BPF_MAP_TYPE_HASH
#define FLOWS_ADD(p, n) __sync_fetch_and_add((p), (n))
#endif

#define DEFINE_FLOW_TABLE(name)						\
	struct {							\
		__uint(type, FLOWS_TABLE_TYPE);				\
		__uint(max_entries, 65536);	/* --max-flows */	\
		__type(key, struct flow_key);				\
		__type(value, struct flow_value);			\
	} name SEC(".maps")

DEFINE_FLOW_TABLE(flows_a);
DEFINE_FLOW_TABLE(flows_b);

/* Filled in by user space (one key per watched interface and direction,
 * plus ifindex 0); the programs never insert here, so it cannot fill up.
 * Shared too, atomic adds: it is only written for flows that find no room. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct flow_ovf_key);
	__type(value, struct flow_ovf_value);
} flows_overflow SEC(".maps");

static __always_inline void flows_count_overflow(__u32 ifindex, __u8 dir, __u64 bytes,
						 __u64 segs, bool full)
{
	struct flow_ovf_key k = { .ifindex = ifindex, .direction = dir };
	struct flow_ovf_value *o = bpf_map_lookup_elem(&flows_overflow, &k);

	if (!o) {
		k.ifindex = 0;
		o = bpf_map_lookup_elem(&flows_overflow, &k);
		if (!o)
			return;
	}
	__sync_fetch_and_add(&o->packets, 1);
	__sync_fetch_and_add(&o->bytes, bytes);
	__sync_fetch_and_add(&o->segments, segs);
	if (full)
		__sync_fetch_and_add(&o->table_full, 1);
	else
		__sync_fetch_and_add(&o->errors, 1);
}

static __always_inline void flows_add(void *table, struct flow_key *key, __u64 bytes,
				      __u64 segs, __u64 tcp_flags)
{
	struct flow_value *v = bpf_map_lookup_elem(table, key);
	/* The coarse clock (tick resolution, same CLOCK_MONOTONIC base) costs a
	 * fraction of bpf_ktime_get_ns here (~30 ns less per packet in a VM);
	 * first/last seen do not need better than a few ms. */
	__u64 now = bpf_ktime_get_coarse_ns();
	long err;

	if (!v) {
		struct flow_value init = {
			.packets = 1, .bytes = bytes, .segments = segs,
			.first_ns = now, .last_ns = now, .tcp_flags = tcp_flags,
		};

		err = bpf_map_update_elem(table, key, &init, BPF_NOEXIST);
		if (!err)
			return;
		/* EEXIST: another CPU inserted the flow first; add to it. */
		if (err != -17 || !(v = bpf_map_lookup_elem(table, key))) {
			flows_count_overflow(key->ifindex, key->direction, bytes, segs,
					     err == -7 /* E2BIG: table full */);
			return;
		}
		if (!v->first_ns)
			v->first_ns = now;	/* per-CPU slot of another CPU's flow */
	}
	FLOWS_ADD(&v->packets, 1);
	FLOWS_ADD(&v->bytes, bytes);
	FLOWS_ADD(&v->segments, segs);
	/* A plain store: any recent time will do when CPUs race. */
	if (v->last_ns != now)
		v->last_ns = now;
	/* Flags change a few times per connection: write only new bits. */
	if ((v->tcp_flags & tcp_flags) != tcp_flags) {
#ifdef FLOWS_PERCPU
		v->tcp_flags |= tcp_flags;
#else
		__sync_fetch_and_or(&v->tcp_flags, tcp_flags);
#endif
	}
}

/* Count one packet already parsed into `p`. */
static __always_inline void flows_account(const struct pkt *p, __u32 ifindex, __u8 dir,
					  __u64 bytes, __u64 segs)
{
	struct flow_key key;

	__builtin_memset(&key, 0, sizeof(key));
	__builtin_memcpy(key.saddr, p->saddr, 16);
	__builtin_memcpy(key.daddr, p->daddr, 16);
	key.ifindex = ifindex;
	key.sport = p->sport;
	key.dport = p->dport;
	key.ethertype = p->ethertype;
	key.proto = p->proto;
	key.direction = dir;
	key.l3 = p->family != 0;
	if (flows_active)
		flows_add(&flows_b, &key, bytes, segs, p->tcp_flags);
	else
		flows_add(&flows_a, &key, bytes, segs, p->tcp_flags);
}

/* skb length and wire segments (gso_segs, at least 1) of a TC packet. */
static __always_inline __u64 flows_skb_segs(struct __sk_buff *skb)
{
	return skb->gso_segs > 1 ? skb->gso_segs : 1;
}

#endif /* EBPF_OTLP_FLOWS_BPF_H */
