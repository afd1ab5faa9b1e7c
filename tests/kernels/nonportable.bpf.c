// SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause
/* Test-only object of the portability tier: the same drop reason read two
 * ways from skb:kfree_skb.
 *
 * reason_core reads ctx->reason through the vmlinux.h type, so libbpf
 * relocates the offset for the running kernel (CO-RE). reason_fixed reads
 * it at REASON_OFF, the offset in the build host's tracepoint format,
 * passed by the test as a plain number: no relocation. On the build host
 * both agree; on a kernel whose record has another layout (6.1 has no
 * rx_sk, so reason moves from 36 to 28) reason_fixed reads whatever lies
 * there, which the tier must catch. It copies with bpf_probe_read_kernel,
 * as hand-written offset code usually does: a direct ctx access beyond
 * 6.1's shorter record would already be refused at attach time, which is a
 * louder and rarer failure than the silent wrong value tested here. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#ifndef REASON_OFF
#error "build with -DREASON_OFF=<offset of reason in the host's kfree_skb format>"
#endif

struct seen {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u64);
};
struct seen seen_core SEC(".maps");
struct seen seen_fixed SEC(".maps");

static __always_inline void count(void *map, __u32 reason)
{
	__u64 one = 1, *v = bpf_map_lookup_elem(map, &reason);

	if (v)
		__sync_fetch_and_add(v, 1);
	else
		bpf_map_update_elem(map, &reason, &one, BPF_NOEXIST);
}

SEC("tracepoint/skb/kfree_skb")
int reason_core(struct trace_event_raw_kfree_skb *ctx)
{
	count(&seen_core, ctx->reason);
	return 0;
}

SEC("tracepoint/skb/kfree_skb")
int reason_fixed(void *ctx)
{
	__u32 reason = 0;

	bpf_probe_read_kernel(&reason, sizeof(reason), (char *)ctx + REASON_OFF);
	count(&seen_fixed, reason);
	return 0;
}
