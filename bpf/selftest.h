/* SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause */
/* Records of the self-test object: read by both clang and cffi, so only
 * fixed-width types, explicit padding and no bitfields. */
#ifndef EBPF_OTLP_SELFTEST_H
#define EBPF_OTLP_SELFTEST_H

struct selftest_event {
	__u64 seq;
	__u64 ts_ns;
	__u32 cpu;
	__u32 pkt_len;
	__u8 pad[24];
};

#endif
