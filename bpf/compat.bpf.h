/* SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause */
/*
 * Older kernels' layouts of kernel structs, as CO-RE `___old` flavours: the
 * suffix is ignored when libbpf matches a type against the running kernel's
 * BTF, so a program written against `struct foo___old` relocates onto
 * whichever `struct foo` the kernel has, if the fields it reads exist there.
 * User space loads the variant whose fields the running kernel's BTF has
 * (ebpf_otlp.btf). Every kernel-version difference the objects handle is
 * declared here, with the change it follows.
 *
 * Fields that merely appeared (skb:kfree_skb's `reason`, 5.17) need no
 * flavour: bpf_core_field_exists() on the current struct is enough.
 */
#ifndef EBPF_OTLP_COMPAT_BPF_H
#define EBPF_OTLP_COMPAT_BPF_H

#include "vmlinux.h"

/*
 * tcp:tcp_retransmit_skb and tcp:tcp_send_reset before 6.10 (tcp_send_reset
 * got its own event class) and 6.13 (tcp_retransmit_skb gained `err`)
 * shared this record layout (tcp.bpf.c: tcp_retransmit_old,
 * tcp_send_reset_old).
 */
struct trace_event_raw_tcp_event_sk_skb___old {
	const void *skbaddr;
	const void *skaddr;
	__u16 sport;
	__u16 dport;
	__u8 saddr_v6[16];
	__u8 daddr_v6[16];
} __attribute__((preserve_access_index));

#endif /* EBPF_OTLP_COMPAT_BPF_H */
