// SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause
/*
 * Flows: packet and byte counts per flow key, aggregated in the kernel.
 *
 * TC clsact programs on ingress and egress (or XDP on ingress) parse
 * Ethernet, up to two VLAN tags, IPv4/IPv6 (options and extension headers
 * skipped) and the L4 ports, and add the packet to a per-CPU hash (no
 * atomics: each CPU owns its slot). User space drains the table once per
 * export interval with batch lookup-and-delete.
 *
 * Double buffering: there are two tables and `flows_active` says which one
 * the programs write. User space flips it, waits a grace period (longer
 * than any program run) and only then drains the table nobody writes any
 * more. Draining a table that programs still write would lose the
 * increments made between the batch copy and the delete, and with
 * preallocated elements could even add them to a recycled element of
 * another flow.
 *
 * The programs never change a packet's fate, whatever they fail to parse or
 * store.
 */
#include "common.bpf.h"
#include "pkt.bpf.h"
#include "flows.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/*
 * TC_ACT_UNSPEC, not TC_ACT_OK: in direct-action mode TC_ACT_OK ends
 * classification on this hook, so the filters after ours (Cilium's, a
 * user's shaper) would never run. UNSPEC means "no opinion": the next
 * filter runs, and with none left the packet simply continues.
 */
#ifndef TC_ACT_UNSPEC
#define TC_ACT_UNSPEC (-1)
#endif

#define ETH_HLEN 14
#define IPPROTO_HOPOPTS_ 0
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define IPPROTO_ROUTING_ 43
#define IPPROTO_FRAGMENT_ 44
#define IPPROTO_AH_ 51
#define IPPROTO_DSTOPTS_ 60
#define IPPROTO_MH_ 135
#define IPPROTO_SCTP_ 132
#define IPPROTO_UDPLITE_ 136
/* Extension headers walked before giving up (the key keeps the one reached). */
#define MAX_IPV6_EXT 8

/* Which table the programs write: 0 -> flows_a, 1 -> flows_b. */
__u32 flows_active = 0;

#define DEFINE_FLOW_TABLE(name)						\
	struct {							\
		__uint(type, BPF_MAP_TYPE_PERCPU_HASH);			\
		__uint(max_entries, 65536);	/* --max-flows */	\
		__type(key, struct flow_key);				\
		__type(value, struct flow_value);			\
	} name SEC(".maps")

DEFINE_FLOW_TABLE(flows_a);
DEFINE_FLOW_TABLE(flows_b);

/* Filled in by user space (one key per watched interface and direction,
 * plus ifindex 0); the programs never insert here, so it cannot fill up. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 256);
	__type(key, struct flow_ovf_key);
	__type(value, struct flow_ovf_value);
} flows_overflow SEC(".maps");

static __always_inline void set_v4_mapped(__u8 *dst, const __u8 *src)
{
	__builtin_memset(dst, 0, 10);
	dst[10] = 0xff;
	dst[11] = 0xff;
	__builtin_memcpy(dst + 12, src, 4);
}

/* Ports (and TCP flags) of the transport header at `off`; zeros if cut short. */
static __always_inline void parse_l4(void *ctx, const bool xdp, __u32 off,
				     struct flow_key *key, __u16 *tcp_flags)
{
	__u8 th[14];

	if (key->proto == IPPROTO_TCP_) {
		if (load(ctx, xdp, off, th, 14))
			return;
		*tcp_flags = th[13];
	} else if (key->proto == IPPROTO_UDP_ || key->proto == IPPROTO_SCTP_ ||
		   key->proto == IPPROTO_UDPLITE_) {
		if (load(ctx, xdp, off, th, 4))
			return;
	} else {
		return;	/* ICMP, ICMPv6 and the rest: no ports */
	}
	key->sport = ((__u16)th[0] << 8) | th[1];
	key->dport = ((__u16)th[2] << 8) | th[3];
}

static __always_inline void parse_ipv4(void *ctx, const bool xdp, __u32 off,
				       struct flow_key *key, __u16 *tcp_flags)
{
	__u8 ip[20];
	__u32 ihl;

	if (load(ctx, xdp, off, ip, 20))
		return;
	ihl = (ip[0] & 0x0f) * 4;
	if ((ip[0] >> 4) != 4 || ihl < 20)
		return;	/* not a readable IPv4 header: counted by ethertype */
	key->l3 = 1;
	key->proto = ip[9];
	set_v4_mapped(key->saddr, ip + 12);
	set_v4_mapped(key->daddr, ip + 16);
	/* Later fragments carry no transport header: ports stay 0. */
	if (((ip[6] & 0x1f) << 8 | ip[7]) != 0)
		return;
	parse_l4(ctx, xdp, off + ihl, key, tcp_flags);
}

static __always_inline void parse_ipv6(void *ctx, const bool xdp, __u32 off,
				       struct flow_key *key, __u16 *tcp_flags)
{
	__u8 ip[40];
	__u8 ext[4];
	__u8 nh;

	if (load(ctx, xdp, off, ip, 40))
		return;
	if ((ip[0] >> 4) != 6)
		return;
	key->l3 = 1;
	__builtin_memcpy(key->saddr, ip + 8, 16);
	__builtin_memcpy(key->daddr, ip + 24, 16);
	nh = ip[6];
	off += 40;
	for (int i = 0; i < MAX_IPV6_EXT; i++) {
		switch (nh) {
		case IPPROTO_HOPOPTS_:
		case IPPROTO_ROUTING_:
		case IPPROTO_DSTOPTS_:
		case IPPROTO_MH_:
			if (load(ctx, xdp, off, ext, 2))
				goto stop;
			nh = ext[0];
			off += ((__u32)ext[1] + 1) * 8;
			break;
		case IPPROTO_AH_:
			if (load(ctx, xdp, off, ext, 2))
				goto stop;
			nh = ext[0];
			off += ((__u32)ext[1] + 2) * 4;
			break;
		case IPPROTO_FRAGMENT_:
			if (load(ctx, xdp, off, ext, 4))
				goto stop;
			nh = ext[0];
			off += 8;
			if ((((__u16)ext[2] << 8) | ext[3]) & 0xfff8) {
				key->proto = nh;	/* later fragment: no ports */
				return;
			}
			break;
		default:
			key->proto = nh;
			parse_l4(ctx, xdp, off, key, tcp_flags);
			return;
		}
	}
stop:
	/* Chain cut short or too long: keep the header we stopped at. */
	key->proto = nh;
}

/* Fill `key` from the frame; whatever is unreadable stays zero. */
static __always_inline void parse(void *ctx, const bool xdp, struct flow_key *key,
				  __u16 *tcp_flags)
{
	__u8 eth[ETH_HLEN];
	__u8 tag[4];
	__u32 off = ETH_HLEN;
	__u16 proto;

	if (load(ctx, xdp, 0, eth, ETH_HLEN))
		return;	/* runt frame: ethertype 0 */
	proto = ((__u16)eth[12] << 8) | eth[13];
	for (int i = 0; i < 2; i++) {
		if (proto != ETH_P_8021Q && proto != ETH_P_8021AD)
			break;
		if (load(ctx, xdp, off, tag, 4)) {
			key->ethertype = proto;	/* tag cut short: count by the tag's type */
			return;
		}
		proto = ((__u16)tag[2] << 8) | tag[3];
		off += 4;
	}
	key->ethertype = proto;
	if (proto == ETH_P_IP)
		parse_ipv4(ctx, xdp, off, key, tcp_flags);
	else if (proto == ETH_P_IPV6)
		parse_ipv6(ctx, xdp, off, key, tcp_flags);
}

static __always_inline void count_overflow(__u32 ifindex, __u8 dir, __u64 bytes, __u64 segs,
					   bool full)
{
	struct flow_ovf_key k = { .ifindex = ifindex, .direction = dir };
	struct flow_ovf_value *o = bpf_map_lookup_elem(&flows_overflow, &k);

	if (!o) {
		k.ifindex = 0;
		o = bpf_map_lookup_elem(&flows_overflow, &k);
		if (!o)
			return;
	}
	o->packets += 1;
	o->bytes += bytes;
	o->segments += segs;
	if (full)
		o->table_full += 1;
	else
		o->errors += 1;
}

static __always_inline void flow_add(void *table, struct flow_key *key, __u64 bytes,
				     __u64 segs, __u16 tcp_flags)
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
		/* EEXIST: another CPU inserted the flow first; use our slot of it. */
		if (err != -17 || !(v = bpf_map_lookup_elem(table, key))) {
			count_overflow(key->ifindex, key->direction, bytes, segs,
				       err == -7 /* E2BIG: table full */);
			return;
		}
		if (!v->first_ns)
			v->first_ns = now;
	}
	v->packets += 1;
	v->bytes += bytes;
	v->segments += segs;
	v->last_ns = now;
	v->tcp_flags |= tcp_flags;
}

static __always_inline void account(void *ctx, const bool xdp, __u8 dir)
{
	struct flow_key key;
	__u16 tcp_flags = 0;
	__u64 bytes, segs = 1;

	__builtin_memset(&key, 0, sizeof(key));
	key.direction = dir;
	if (xdp) {
		struct xdp_md *x = ctx;

		/* Plain (non-frags) XDP: the frame is all linear. */
		bytes = x->data_end - x->data;
		key.ifindex = x->ingress_ifindex;
	} else {
		struct __sk_buff *skb = ctx;

		bytes = skb->len;
		key.ifindex = skb->ifindex;
		if (skb->gso_segs > 1)
			segs = skb->gso_segs;
	}
	parse(ctx, xdp, &key, &tcp_flags);
	if (flows_active)
		flow_add(&flows_b, &key, bytes, segs, tcp_flags);
	else
		flow_add(&flows_a, &key, bytes, segs, tcp_flags);
}

SEC("tc")
int flows_tc_ingress(struct __sk_buff *skb)
{
	account(skb, false, FLOW_DIR_RECEIVE);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int flows_tc_egress(struct __sk_buff *skb)
{
	account(skb, false, FLOW_DIR_TRANSMIT);
	return TC_ACT_UNSPEC;
}

SEC("xdp")
int flows_xdp_ingress(struct xdp_md *ctx)
{
	account(ctx, true, FLOW_DIR_RECEIVE);
	return XDP_PASS;
}
