// SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause
/* Packet drops with the kernel's own reason, from skb:kfree_skb.
 *
 * Every drop is counted in the kernel per (reason, location, flow key,
 * interface); user space drains the table once per interval, so a drop
 * storm costs no per-drop work outside the kernel. Two tables alternate
 * (`active` picks the one written) so that a drain never races with an
 * increment: user space flips `active`, lets in-flight programs finish,
 * then drains the table nobody writes any more. */
#include "pkt.bpf.h"
#include "drops.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Values of SKB_CONSUMED and SKB_DROP_REASON_NOT_SPECIFIED in the running
 * kernel's BTF, set by user space before load (the enum is not stable). A
 * value the kernel lacks is set to DROP_REASON_UNKNOWN - 1, never seen. */
const volatile __u32 reason_consumed = 1;
const volatile __u32 reason_not_specified = 2;
const volatile __u8 exclude_not_specified = 0;
/* When set, only the reasons whose bit is set in reason_bits are counted:
 * decided before anything else is read, so an unwanted drop costs a few
 * instructions (bench/pktcost.py). */
const volatile __u8 reason_filter = 0;
const volatile __u64 reason_bits[DROP_REASON_WORDS] = {};
/* Keep the drop location in the key (more series) only when exported. */
const volatile __u8 keep_location = 0;
/* --attribution none: the namespace of a drop names no pod, so the key keeps
 * only whether it is the agent's own (`own_netns`, where an interface index
 * can still be named) and drops in every other namespace share one key. */
const volatile __u8 keep_netns = 1;
const volatile __u32 own_netns = 0;

/* Which table the program writes: 0 or 1, flipped by user space. */
__u32 active = 0;

#define DEFINE_DROP_TABLE(name)					\
	struct {							\
		__uint(type, BPF_MAP_TYPE_HASH);			\
		__uint(max_entries, 16384);				\
		__type(key, struct drop_key);				\
		__type(value, struct drop_value);			\
	} name SEC(".maps")

DEFINE_DROP_TABLE(drops_0);
DEFINE_DROP_TABLE(drops_1);

/* Drops that found the table full, per reason; cumulative, never drained
 * (so no race either). Shared with atomic adds: its memory does not grow
 * with the number of CPUs. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} drop_overflow SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROP_STAT_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} drop_stats SEC(".maps");

static __always_inline void stat_add(__u32 slot)
{
	__u64 *n = bpf_map_lookup_elem(&drop_stats, &slot);

	if (n)
		*n += 1;
}

/* The netns the interface index belongs to: the device's, else the socket's. */
static __always_inline __u32 netns_of(struct net_device *dev, struct sk_buff *skb)
{
	struct net *net = NULL;
	struct sock *sk;

	if (dev) {
		net = BPF_CORE_READ(dev, nd_net.net);
	} else {
		sk = BPF_CORE_READ(skb, sk);
		if (sk)
			net = BPF_CORE_READ(sk, __sk_common.skc_net.net);
	}
	return net ? BPF_CORE_READ(net, ns.inum) : 0;
}

static __always_inline void fill_key(struct drop_key *k, struct sk_buff *skb, __u16 proto)
{
	struct net_device *dev = BPF_CORE_READ(skb, dev);
	unsigned char *head = BPF_CORE_READ(skb, head);
	__u32 nh = BPF_CORE_READ(skb, network_header);
	__u32 tail = BPF_CORE_READ(skb, tail);
	__u16 mac;
	__u8 ver = 0;

	if (dev) {
		k->ifindex = BPF_CORE_READ(dev, ifindex);
		bpf_probe_read_kernel_str(k->ifname, sizeof(k->ifname), dev->name);
	} else {
		k->ifindex = BPF_CORE_READ(skb, skb_iif);
	}
	k->netns = netns_of(dev, skb);
	if (!keep_netns && k->netns != own_netns)
		k->netns = 0;
	k->l3proto = proto;
	if (!head)
		return;
	/* A received skb freed before __netif_receive_skb_core() reset its
	 * network header still has the one __alloc_skb() left (0, the
	 * headroom); eth_type_trans() has already moved data to L3 by then. */
	mac = BPF_CORE_READ(skb, mac_header);
	if (mac != (__u16)~0U && nh <= mac)
		nh = BPF_CORE_READ(skb, data) - head;
	/* Locally built packets may be freed before skb->protocol is set:
	 * then trust the version nibble of what sits at the network header. */
	if (proto == 0 && nh + 1 <= tail &&
	    !bpf_probe_read_kernel(&ver, 1, head + nh))
		proto = (ver >> 4) == 4 ? ETH_P_IP : (ver >> 4) == 6 ? ETH_P_IPV6 : 0;
	if (nh < tail) {
		struct pkt_kmem mem = { .base = head + nh, .len = tail - nh };
		struct pkt p;

		pkt_parse_l3(&mem, PKT_KMEM, 0, proto, &p);
		k->family = p.family;
		k->l4proto = p.proto;
		__builtin_memcpy(k->saddr, p.saddr, 16);
		__builtin_memcpy(k->daddr, p.daddr, 16);
		k->sport = p.sport;
		k->dport = p.dport;
	}
}

static __always_inline void overflow(__u32 reason)
{
	__u64 zero = 0, *n;

	stat_add(DROP_STAT_TABLE_FULL);
	n = lookup_or_try_init(&drop_overflow, &reason, &zero);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		stat_add(DROP_STAT_OVERFLOW_LOST);
}

static __always_inline void account(void *table, struct drop_key *k)
{
	struct drop_value *v = bpf_map_lookup_elem(table, k);

	if (!v) {
		struct drop_value init = {
			.packets = 1, .first_ns = bpf_ktime_get_ns(),
		};
		long err = bpf_map_update_elem(table, k, &init, BPF_NOEXIST);

		if (!err)
			return;
		/* EEXIST: another CPU inserted the same key meanwhile. */
		v = err == -17 ? bpf_map_lookup_elem(table, k) : NULL;
		if (!v) {
			overflow(k->reason);
			return;
		}
	}
	__sync_fetch_and_add(&v->packets, 1);
}

SEC("tracepoint/skb/kfree_skb")
int on_kfree_skb(struct trace_event_raw_kfree_skb *ctx)
{
	struct sk_buff *skb = ctx->skbaddr;
	struct drop_key key;
	__u32 reason = DROP_REASON_UNKNOWN;

	/* The field arrived in 5.17; before it every kfree_skb was a drop. */
	if (bpf_core_field_exists(ctx->reason))
		reason = ctx->reason;
	if (reason == reason_consumed)
		return 0;
	if (reason_filter) {
		__u32 w = reason >> 6;

		if (w >= DROP_REASON_WORDS || !(reason_bits[w] & (1ULL << (reason & 63))))
			return 0;
	}
	if (exclude_not_specified && reason == reason_not_specified)
		return 0;
	stat_add(DROP_STAT_EVENTS);

	__builtin_memset(&key, 0, sizeof(key));
	key.reason = reason;
	if (keep_location)
		key.location = (__u64)ctx->location;
	if (skb)
		fill_key(&key, skb, ctx->protocol);
	if (active & 1)
		account(&drops_1, &key);
	else
		account(&drops_0, &key);
	return 0;
}
