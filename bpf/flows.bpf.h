/* SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause */
/*
 * Flow accounting of the one-program-per-hook packet object (packet.bpf.c).
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

/* Per-CPU front slots of both tables (flows.h). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 * FLOWS_FRONT_SLOTS);
	__type(key, __u32);
	__type(value, struct flow_front);
} flows_front SEC(".maps");

static __always_inline void flows_count_overflow(const struct flow_key *key,
						 const struct flow_value *val, bool full)
{
	struct flow_ovf_key k = { .ifindex = key->ifindex, .direction = key->direction };
	struct flow_ovf_value *o = bpf_map_lookup_elem(&flows_overflow, &k);

	if (!o) {
		k.ifindex = 0;
		o = bpf_map_lookup_elem(&flows_overflow, &k);
		if (!o)
			return;
	}
	__sync_fetch_and_add(&o->packets, val->packets);
	__sync_fetch_and_add(&o->bytes, val->bytes);
	__sync_fetch_and_add(&o->segments, val->segments);
	if (full)
		__sync_fetch_and_add(&o->table_full, 1);
	else
		__sync_fetch_and_add(&o->errors, 1);
}

/* Add `val` (one or more packets of one flow) to the shared table. */
static __always_inline void flows_spill(void *table, const struct flow_key *key,
					const struct flow_value *val)
{
	struct flow_value *v = bpf_map_lookup_elem(table, key);
	long err;

	if (!v) {
		/* The coarse clock (tick resolution, same CLOCK_MONOTONIC base) costs
		 * a fraction of bpf_ktime_get_ns here (~30 ns less in a VM); first
		 * seen does not need better than a few ms. Read on inserts only. */
		struct flow_value init = *val;

		init.first_ns = bpf_ktime_get_coarse_ns();
		err = bpf_map_update_elem(table, key, &init, BPF_NOEXIST);
		if (!err)
			return;
		/* EEXIST: another CPU inserted the flow first; add to it. */
		if (err != -17 || !(v = bpf_map_lookup_elem(table, key))) {
			flows_count_overflow(key, val, err == -7 /* E2BIG: table full */);
			return;
		}
		if (!v->first_ns)
			v->first_ns = init.first_ns;	/* per-CPU slot of another CPU's flow */
	}
	FLOWS_ADD(&v->packets, val->packets);
	FLOWS_ADD(&v->bytes, val->bytes);
	FLOWS_ADD(&v->segments, val->segments);
	/* Flags change a few times per connection: write only new bits. */
	if ((v->tcp_flags & val->tcp_flags) != val->tcp_flags) {
#ifdef FLOWS_PERCPU
		v->tcp_flags |= val->tcp_flags;
#else
		__sync_fetch_and_or(&v->tcp_flags, val->tcp_flags);
#endif
	}
}

/* Both keys 8-byte aligned (the program's own on the stack: declared so). */
static __always_inline bool flows_key_eq(const struct flow_key *a, const struct flow_key *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;

	return !((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) |
		 (x[4] ^ y[4]) | (x[5] ^ y[5]));
}

/* Count one packet already parsed into `p`. */
static __always_inline void flows_account(const struct pkt *p, __u32 ifindex, __u8 dir,
					  __u64 bytes, __u64 segs)
{
	struct flow_key key __attribute__((aligned(8)));
	struct flow_front *f;
	__u32 table = flows_active & 1, slot;
	void *map = table ? (void *)&flows_b : (void *)&flows_a;

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

	slot = (key.sport ^ key.dport ^ ifindex ^ dir ^ key.saddr[15] ^ key.daddr[15]) &
	       (FLOWS_FRONT_SLOTS - 1);
	slot += table * FLOWS_FRONT_SLOTS;
	f = bpf_map_lookup_elem(&flows_front, &slot);
	if (!f) {	/* cannot happen (array index in range); count in the table */
		struct flow_value one = { .packets = 1, .bytes = bytes, .segments = segs,
					  .tcp_flags = p->tcp_flags };

		flows_spill(map, &key, &one);
		return;
	}
	if (f->value.packets && flows_key_eq(&f->key, &key)) {
		f->value.packets += 1;
		f->value.bytes += bytes;
		f->value.segments += segs;
		f->value.tcp_flags |= p->tcp_flags;
		return;
	}
	if (f->value.packets)
		flows_spill(map, &f->key, &f->value);
	f->key = key;
	f->value.packets = 1;
	f->value.bytes = bytes;
	f->value.segments = segs;
	f->value.first_ns = 0;
	f->value.tcp_flags = p->tcp_flags;
}

/* skb length and wire segments (gso_segs, at least 1) of a TC packet. */
static __always_inline __u64 flows_skb_segs(struct __sk_buff *skb)
{
	return skb->gso_segs > 1 ? skb->gso_segs : 1;
}

#endif /* EBPF_OTLP_FLOWS_BPF_H */
