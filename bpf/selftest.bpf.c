// SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause
/* The self-test object: one small program per hook kind, used by
 * `ebpf-otlp doctor` to try each hook for real, by the platform tests and
 * by the ring buffer benchmark. Each program is loaded on its own, so a
 * kernel without (say) kprobes only loses that probe. */
#include "common.bpf.h"
#include "selftest.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* The pid whose calls the tracepoint probes count; 0 counts every pid. */
const volatile __u32 target_pid = 0;
/* Records per run written by rb_produce (bounded loop). */
const volatile __u32 records_per_run = 1;

DEFINE_RINGBUF(test_events, 1 << 20);
EXPORT_BTF(struct selftest_event);

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} hits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} percpu_hits SEC(".maps");

__u64 seq = 0;

static __always_inline void count_hit(__u32 what)
{
	__u64 one = 1, *v;

	v = bpf_map_lookup_elem(&hits, &what);
	if (v)
		__sync_fetch_and_add(v, 1);
	else
		bpf_map_update_elem(&hits, &what, &one, BPF_NOEXIST);
	v = bpf_map_lookup_elem(&percpu_hits, &what);
	if (v)
		*v += 1;
	else
		bpf_map_update_elem(&percpu_hits, &what, &one, BPF_NOEXIST);
}

static __always_inline void hit(__u32 what)
{
	__u32 pid = bpf_get_current_pid_tgid() >> 32;

	if (target_pid && pid != target_pid)
		return;
	count_hit(what);
}

enum { HIT_TP = 1, HIT_RAW_TP = 2, HIT_KPROBE = 3, HIT_FENTRY = 4, HIT_UPROBE = 5,
       HIT_URETPROBE = 6, HIT_SOCKOPS = 7 };

SEC("tracepoint/syscalls/sys_enter_getppid")
int probe_tracepoint(void *ctx)
{
	hit(HIT_TP);
	return 0;
}

SEC("raw_tracepoint/sys_enter")
int probe_raw_tracepoint(void *ctx)
{
	hit(HIT_RAW_TP);
	return 0;
}

SEC("kprobe/do_nanosleep")
int probe_kprobe(void *ctx)
{
	hit(HIT_KPROBE);
	return 0;
}

SEC("fentry/do_nanosleep")
int BPF_PROG(probe_fentry)
{
	hit(HIT_FENTRY);
	return 0;
}

SEC("uprobe")
int probe_uprobe(void *ctx)
{
	hit(HIT_UPROBE);
	return 0;
}

SEC("uretprobe")
int probe_uretprobe(void *ctx)
{
	hit(HIT_URETPROBE);
	return 0;
}

SEC("sockops")
int probe_sockops(struct bpf_sock_ops *skops)
{
	/* No pid filter: 6.1 refuses bpf_get_current_pid_tgid in sock_ops. */
	count_hit(HIT_SOCKOPS);
	return 1;
}

SEC("xdp")
int probe_xdp(struct xdp_md *ctx)
{
	return XDP_PASS;
}

SEC("tc")
int probe_tc(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

/* Ring buffer producer for tests and the drain benchmark: driven by
 * BPF_PROG_TEST_RUN, writes `records_per_run` records per run. */
SEC("xdp")
int rb_produce(struct xdp_md *ctx)
{
	for (__u32 i = 0; i < 64; i++) {
		struct selftest_event *e;

		if (i >= records_per_run)
			break;
		e = RINGBUF_RESERVE(test_events, sizeof(*e));
		if (!e)
			continue; /* counted in test_events_lost */
		e->seq = __sync_fetch_and_add(&seq, 1);
		e->ts_ns = bpf_ktime_get_ns();
		e->cpu = bpf_get_smp_processor_id();
		e->pkt_len = ctx->data_end - ctx->data;
		__builtin_memset(e->pad, 0, sizeof(e->pad));
		RINGBUF_SUBMIT(test_events, e);
	}
	return XDP_PASS;
}
