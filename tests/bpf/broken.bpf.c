// SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause
/* Deliberately rejected by the verifier: reads packet data without a bounds
 * check. The test expects the verifier's log in the BpfError. */
#include "common.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("xdp")
int unchecked_read(struct xdp_md *ctx)
{
	__u8 *data = (void *)(long)ctx->data;

	return data[20] == 7 ? XDP_DROP : XDP_PASS;
}
