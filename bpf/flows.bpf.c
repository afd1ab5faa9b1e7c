// SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause
/*
 * Flows: packet and byte counts per flow key, aggregated in the kernel.
 *
 * TC clsact programs on ingress and egress (or XDP on ingress) parse the
 * packet with the shared parser (pkt.bpf.h) and add it to the flow table
 * (flows.bpf.h). User space drains the table once per export interval with
 * batch lookup-and-delete. The packet object (packet.bpf.c) runs the same
 * accounting and the DNS capture from one program per hook.
 *
 * The programs never change a packet's fate, whatever they fail to parse or
 * store.
 */
#include "flows.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tc")
int flows_tc_ingress(struct __sk_buff *skb)
{
	struct pkt p;

	pkt_parse_eth(skb, PKT_SKB, &p);
	flows_account(&p, skb->ifindex, FLOW_DIR_RECEIVE, skb->len, flows_skb_segs(skb));
	return TC_ACT_UNSPEC;
}

SEC("tc")
int flows_tc_egress(struct __sk_buff *skb)
{
	struct pkt p;

	pkt_parse_eth(skb, PKT_SKB, &p);
	flows_account(&p, skb->ifindex, FLOW_DIR_TRANSMIT, skb->len, flows_skb_segs(skb));
	return TC_ACT_UNSPEC;
}

SEC("xdp")
int flows_xdp_ingress(struct xdp_md *ctx)
{
	struct pkt p;

	pkt_parse_eth(ctx, PKT_XDP, &p);
	/* Plain (non-frags) XDP: the frame is all linear. */
	flows_account(&p, ctx->ingress_ifindex, FLOW_DIR_RECEIVE, ctx->data_end - ctx->data, 1);
	return XDP_PASS;
}
