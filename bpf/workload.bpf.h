/* SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause */
/* Where a socket belongs, read with CO-RE (works in softirq, where
 * bpf_get_current_cgroup_id() would name whoever the CPU interrupted):
 * the cgroup v2 id the socket was charged to when its owner created it
 * (accepted sockets inherit the listener's), and the inode of its network
 * namespace. User space resolves both (ebpf_otlp.platform.workloads). */
#ifndef EBPF_OTLP_WORKLOAD_BPF_H
#define EBPF_OTLP_WORKLOAD_BPF_H

static __always_inline __u64 sock_cgroup_id(struct sock *sk)
{
	struct cgroup *cg = BPF_CORE_READ(sk, sk_cgrp_data.cgroup);

	return cg ? BPF_CORE_READ(cg, kn, id) : 0;
}

static __always_inline __u32 sock_netns(struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
}

#endif
