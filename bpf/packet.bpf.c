// SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause
/*
 * One program per hook and direction: parse the packet once (pkt.bpf.h),
 * then do the flow accounting (flows.bpf.h) and the DNS capture
 * (dns.bpf.h) from that one parse. A signal that is off is a branch on a
 * frozen rodata flag, which the verifier removes as dead code: it costs
 * nothing at run time (bench/pktcost.py measures each combination against
 * an empty program).
 *
 * The same programs attach through TCX links (6.6+) or legacy TC clsact
 * filters; XDP flow mode keeps its own program (flows only: DNS needs the
 * skb). The programs never change a packet's fate: TC_ACT_UNSPEC / XDP_PASS.
 */
#include "flows.bpf.h"
#include "dns.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Set by user space before load. */
const volatile __u8 flows_on = 1;
const volatile __u8 dns_on = 1;
const volatile __u8 hook_count_on = 0;
/* 0 when XDP does the ingress flow accounting (packet_xdp_ingress) and the TC
 * ingress program is there for DNS only. */
const volatile __u8 flows_tc_ingress = 1;

/*
 * Packets seen per hook, keyed HOOK_KEY(ifindex, direction): the proof that
 * a hook is alive, compared by user space with the interface's own counters.
 * User space inserts one key per attached hook; the programs never insert,
 * so it cannot fill up. Per-CPU: one plain add, no shared cache line between
 * CPUs on the hot path (entries x 8 bytes x CPUs: 4 KiB per CPU at 256 hooks).
 */
#define HOOK_KEY(ifindex, dir) (((__u32)(ifindex) << 1) | (dir))

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 512);
	__type(key, __u32);
	__type(value, __u64);
} hook_seen SEC(".maps");

/*
 * The fast path of the same count: a per-CPU array slot per (ifindex modulo
 * HOOK_SLOTS, direction) that user space gives to the first watched interface
 * with that residue (it writes the owner's ifindex into every CPU's copy).
 * An array lookup is inlined by the verifier; a hash lookup hashes the key,
 * which cost ~30-50 ns per packet here (bench/pktcost.py). Interfaces whose
 * slot belongs to another one count in hook_seen, so every count is exact.
 */
#define HOOK_SLOTS 128

struct hook_slot {
	__u32 ifindex;
	__u32 pad;
	__u64 packets;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 * HOOK_SLOTS);
	__type(key, __u32);
	__type(value, struct hook_slot);
} hook_slots SEC(".maps");

static __always_inline void hook_count(__u32 ifindex, __u8 dir)
{
	__u32 k = HOOK_KEY(ifindex & (HOOK_SLOTS - 1), dir);
	struct hook_slot *s = bpf_map_lookup_elem(&hook_slots, &k);
	__u64 *n;

	if (s && s->ifindex == ifindex) {
		s->packets += 1;
		return;
	}
	k = HOOK_KEY(ifindex, dir);
	n = bpf_map_lookup_elem(&hook_seen, &k);
	if (n)
		*n += 1;
}

static __always_inline int handle(struct __sk_buff *skb, __u8 dir, const bool l3)
{
	struct pkt p;

	if (hook_count_on)
		hook_count(skb->ifindex, dir);
	if (!(flows_on && (dir == FLOW_DIR_TRANSMIT || flows_tc_ingress)) && !dns_on)
		return TC_ACT_UNSPEC;
	pkt_parse_skb(skb, l3, &p);
	if (flows_on && (dir == FLOW_DIR_TRANSMIT || flows_tc_ingress))
		flows_account(&p, skb->ifindex, dir, skb->len, flows_skb_segs(skb));
	if (dns_on)
		dns_capture(skb, &p, dir);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int packet_tc_ingress(struct __sk_buff *skb)
{
	return handle(skb, FLOW_DIR_RECEIVE, false);
}

SEC("tc")
int packet_tc_egress(struct __sk_buff *skb)
{
	return handle(skb, FLOW_DIR_TRANSMIT, false);
}

/* Devices without a link-layer header (tun, WireGuard, IP-in-IP); user space
 * picks the pair by the device's type (/sys/class/net/<if>/type). */
SEC("tc")
int packet_tc_ingress_l3(struct __sk_buff *skb)
{
	return handle(skb, FLOW_DIR_RECEIVE, true);
}

SEC("tc")
int packet_tc_egress_l3(struct __sk_buff *skb)
{
	return handle(skb, FLOW_DIR_TRANSMIT, true);
}

SEC("xdp")
int packet_xdp_ingress(struct xdp_md *ctx)
{
	struct pkt p;

	if (hook_count_on)
		hook_count(ctx->ingress_ifindex, FLOW_DIR_RECEIVE);
	if (!flows_on)
		return XDP_PASS;
	pkt_parse_eth(ctx, PKT_XDP, &p);
	/* Plain (non-frags) XDP: the frame is all linear. */
	flows_account(&p, ctx->ingress_ifindex, FLOW_DIR_RECEIVE, ctx->data_end - ctx->data, 1);
	return XDP_PASS;
}
