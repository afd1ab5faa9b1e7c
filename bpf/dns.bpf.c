// SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause
/* DNS: getaddrinfo() latency from libc uprobes. The DNS messages on the wire
 * are captured by the packet object (packet.bpf.c, dns.bpf.h), whose one
 * program per hook also does the flow accounting. */
#include "common.bpf.h"
#include "dns.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* --- getaddrinfo() latency (uprobes on libc) ------------------------------ */

struct gai_start {
	__u64 ts_ns;
	__u8 name[DNS_GAI_NAME];
};

/* Calls in flight, by thread (a thread is in one getaddrinfo at a time). LRU:
 * a thread that dies inside getaddrinfo never deletes its entry; user space
 * sweeps such entries once per interval and counts them. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, struct gai_start);
} gai_calls SEC(".maps");

/* Calls not measured: [DNS_GAI_TABLE_FULL] the insert failed,
 * [DNS_GAI_NO_START] a return whose start was not recorded (evicted, or the
 * call began before the agent). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} gai_untracked SEC(".maps");

DEFINE_RINGBUF(gai_events, 256 << 10);

EXPORT_BTF(struct gai_event);

SEC("uprobe")
int BPF_KPROBE(gai_enter, const char *node)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct gai_start s = {};

	s.ts_ns = bpf_ktime_get_ns();
	if (node)
		bpf_probe_read_user_str(s.name, sizeof(s.name), node);
	if (bpf_map_update_elem(&gai_calls, &id, &s, BPF_ANY))
		count_one(&gai_untracked); /* slot 0: DNS_GAI_TABLE_FULL */
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(gai_exit, int ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct gai_start *s = bpf_map_lookup_elem(&gai_calls, &id);
	struct gai_event *e;

	if (!s) {
		__u32 slot = DNS_GAI_NO_START;
		__u64 *n = bpf_map_lookup_elem(&gai_untracked, &slot);

		if (n)
			*n += 1;
		return 0;
	}
	e = RINGBUF_RESERVE(gai_events, sizeof(*e));
	if (e) {
		e->ts_ns = s->ts_ns;
		e->duration_ns = bpf_ktime_get_ns() - s->ts_ns;
		e->pid = id >> 32;
		e->tid = (__u32)id;
		e->ret = ret;
		bpf_get_current_comm(e->comm, sizeof(e->comm));
		__builtin_memcpy(e->name, s->name, sizeof(e->name));
		__builtin_memset(e->pad, 0, sizeof(e->pad));
		e->cgroup_id = bpf_get_current_cgroup_id();
		RINGBUF_SUBMIT(gai_events, e);
	}
	bpf_map_delete_elem(&gai_calls, &id);
	return 0;
}
