/* SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause */
/* Shared BPF-side helpers: ring buffers that count their own losses and
 * wake user space in batches, and lookup-or-init for hash maps. */
#ifndef EBPF_OTLP_COMMON_BPF_H
#define EBPF_OTLP_COMMON_BPF_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_tracing.h>

#ifndef TC_ACT_OK
#define TC_ACT_OK 0
#endif
/*
 * Packet programs return TC_ACT_UNSPEC, not TC_ACT_OK: in direct-action mode
 * (and in TCX) TC_ACT_OK ends classification on this hook, so the programs
 * after ours (Cilium's, a user's shaper) would never run. UNSPEC means "no
 * opinion": the next program runs, and with none left the packet simply
 * continues.
 */
#ifndef TC_ACT_UNSPEC
#define TC_ACT_UNSPEC (-1)
#endif
#ifndef ETH_P_IP
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8
#endif
#ifndef BPF_ANY
#define BPF_ANY 0
#define BPF_NOEXIST 1
#define BPF_EXIST 2
#endif
#ifndef BPF_F_NO_PREALLOC
#define BPF_F_NO_PREALLOC (1U << 0)
#endif

/*
 * Wake the consumer only once this many bytes wait in a ring: a wake-up
 * costs ~8 us here against ~0.1 us for a submit (PERF.md). User space also
 * drains on a short timer, so a quiet ring is never stranded. Set from
 * user space before load; 0 means wake on every record.
 */
const volatile __u32 ringbuf_wakeup_bytes = 0;

/*
 * DEFINE_RINGBUF(name, bytes) declares a ring buffer `name` and a per-CPU
 * counter `name_lost` of records that could not be reserved; the Python
 * consumer finds the counter by that name and exports it.
 */
#define DEFINE_RINGBUF(name, bytes)					\
	struct {							\
		__uint(type, BPF_MAP_TYPE_RINGBUF);			\
		__uint(max_entries, bytes);				\
	} name SEC(".maps");						\
	struct {							\
		__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);		\
		__uint(max_entries, 1);					\
		__type(key, __u32);					\
		__type(value, __u64);					\
	} name##_lost SEC(".maps")

static __always_inline void count_one(void *percpu_array_map)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(percpu_array_map, &zero);

	if (n)
		*n += 1;
}

/* Reserve a record, counting the failure in `name_lost`. */
#define RINGBUF_RESERVE(name, size)					\
	({								\
		void *__rec = bpf_ringbuf_reserve(&name, size, 0);	\
		if (!__rec)						\
			count_one(&name##_lost);			\
		__rec;							\
	})

static __always_inline void ringbuf_submit_batched(void *ring, void *rec, __u64 size)
{
	__u64 flags = BPF_RB_NO_WAKEUP;
	__u64 avail = bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA);
	__u64 t = ringbuf_wakeup_bytes;

	/*
	 * Wake when this record (8-byte header, 8-byte aligned) takes the
	 * backlog across a multiple of the threshold: one wake-up per `t` bytes
	 * queued. Waking on every record while the backlog is above `t` made
	 * each of those submits cost ~7 us instead of ~0.3 us until the
	 * consumer caught up (bench/pktcost.py, bench/ringbuf.py).
	 */
	if (t == 0 || (avail >= t && avail / t != (avail - ((size + 15) & ~7ULL)) / t))
		flags = BPF_RB_FORCE_WAKEUP;
	bpf_ringbuf_submit(rec, flags);
}

/* `rec` must be a typed pointer: its size finds the threshold crossing. */
#define RINGBUF_SUBMIT(name, rec) ringbuf_submit_batched(&name, rec, sizeof(*(rec)))

/* Find `key` in a hash map or insert `init` for it; NULL when the map is full. */
static __always_inline void *lookup_or_try_init(void *map, const void *key,
						const void *init)
{
	void *val = bpf_map_lookup_elem(map, key);
	long err;

	if (val)
		return val;
	err = bpf_map_update_elem(map, key, init, BPF_NOEXIST);
	if (err && err != -17 /* EEXIST: another CPU won the race */)
		return NULL;
	return bpf_map_lookup_elem(map, key);
}

/*
 * Types only used through pointers do not reach BTF; a record struct must,
 * so that tests can compare the object's layout with the Python side's.
 * EXPORT_BTF(struct foo) keeps it with an unused .bss pointer.
 */
#define EXPORT_BTF_NAME2(a, b) a##b
#define EXPORT_BTF_NAME(a, b) EXPORT_BTF_NAME2(a, b)
#define EXPORT_BTF(type) type *EXPORT_BTF_NAME(__btf_export_, __LINE__) __attribute__((unused))

#endif /* EBPF_OTLP_COMMON_BPF_H */
