/* SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause */
/* Reading packet headers from TC and XDP programs (flows, DNS). */
#ifndef EBPF_OTLP_PKT_BPF_H
#define EBPF_OTLP_PKT_BPF_H

#include "common.bpf.h"

/* Headers further into the frame than this are not read (bounds the verifier). */
#define MAX_HDR_OFF 1024

/*
 * Copy `len` header bytes at `off`: straight from the linear data when it
 * is there (cheap: no helper call), else through the helper that also reads
 * paged data. Non-zero when the frame is too short.
 */
static __always_inline int load(void *ctx, const bool xdp, __u32 off, void *to,
				const __u32 len)
{
	void *data, *data_end;

	if (off > MAX_HDR_OFF)
		return -1;
	if (xdp) {
		data = (void *)(long)((struct xdp_md *)ctx)->data;
		data_end = (void *)(long)((struct xdp_md *)ctx)->data_end;
	} else {
		data = (void *)(long)((struct __sk_buff *)ctx)->data;
		data_end = (void *)(long)((struct __sk_buff *)ctx)->data_end;
	}
	if (data + off + len <= data_end) {
		__builtin_memcpy(to, data + off, len);
		return 0;
	}
	if (xdp)
		return bpf_xdp_load_bytes(ctx, off, to, len);
	return bpf_skb_load_bytes(ctx, off, to, len);
}

#endif /* EBPF_OTLP_PKT_BPF_H */
