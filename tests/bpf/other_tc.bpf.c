// SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause
/* Another tool's TC program, for the coexistence tests (tests/test_tcx.py):
 * counts UDP/IPv4 packets to two ports and drops those to `shot_port`. */
#include "common.bpf.h"

#define TC_ACT_SHOT 2

char LICENSE[] SEC("license") = "Dual BSD/GPL";

const volatile __u16 shot_port = 0;
const volatile __u16 pass_port = 0;
/* The verdict for every other packet: TC_ACT_UNSPEC (next program runs) or
 * TC_ACT_OK (classification ends here: programs after this one see nothing). */
const volatile __s32 other_verdict = TC_ACT_UNSPEC;

/* [0] packets to shot_port (dropped), [1] packets to pass_port */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} other_counts SEC(".maps");

SEC("tc")
int other_tc(struct __sk_buff *skb)
{
	__u8 ip[20];
	__u16 dport;
	__u32 slot;
	__u64 *n;

	if (bpf_skb_load_bytes(skb, 14, ip, 20) || (ip[0] >> 4) != 4 || ip[9] != 17)
		return other_verdict;
	if (bpf_skb_load_bytes(skb, 14 + (ip[0] & 0xf) * 4 + 2, &dport, 2))
		return other_verdict;
	dport = bpf_ntohs(dport);
	if (dport != shot_port && dport != pass_port)
		return other_verdict;
	slot = dport == shot_port ? 0 : 1;
	n = bpf_map_lookup_elem(&other_counts, &slot);
	if (n)
		__sync_fetch_and_add(n, 1);
	return dport == shot_port ? TC_ACT_SHOT : other_verdict;
}
