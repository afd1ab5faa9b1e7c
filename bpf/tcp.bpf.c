// SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause
/*
 * TCP health from tracepoints and sock_ops only (no kprobes, no fentry):
 *
 *  - sock:inet_sock_set_state drives a per-socket table (LRU hash keyed by
 *    the struct sock address): client entries are born at CLOSE->SYN_SENT
 *    (process context, inside connect(), so the owner is `current`), server
 *    entries when the child socket is cloned (LISTEN->SYN_RECV, at the final
 *    ACK). ESTABLISHED emits an OPEN record, CLOSE a CLOSE or FAIL record
 *    with the counters read from struct tcp_sock via CO-RE.
 *  - sock_ops (cgroup v2) stamps the arrival of each SYN on the request sock
 *    (TIMEOUT_INIT runs in tcp_conn_request), which is the start of a server
 *    handshake, and samples the smoothed RTT of live connections through
 *    BPF_SOCK_OPS_RTT_CB at most once per rtt_sample_ns per connection.
 *  - sock_ops also keeps `opened` and the `active` gauge: +1 at
 *    ACTIVE/PASSIVE_ESTABLISHED_CB under a key stored in the socket's own
 *    storage (conn_keys, no capacity to run out of), -1 to that stored key
 *    at STATE_CB -> TCP_CLOSE. Without sock_ops (no cgroup v2), user space
 *    sets tp_counts_conns and the tracepoints count them for the sockets of
 *    the `socks` table instead (fewer while it is full).
 *  - tcp:tcp_retransmit_skb / tcp_retransmit_synack / tcp_send_reset /
 *    tcp_receive_reset add to in-kernel counters drained per interval.
 *  - syscalls:sys_exit_accept{,4} attribute passive opens (their state
 *    changes run in softirq context) to the accepting process.
 */
#include "common.bpf.h"
#include "compat.bpf.h"
#include "tcp.h"
#include "workload.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define EAGAIN 11
#define ENOMEM 12
#define EBUSY 16
#define EINVAL 22
#define EHOSTUNREACH 113

/* Counter key fields the user keeps; the others are zeroed (bounded map). */
const volatile __u8 keep_saddr = 1;
const volatile __u8 keep_sport = 1;
const volatile __u8 keep_caddr = 0;
const volatile __u8 keep_cport = 0;
/* Whose connection (--attribution): the cgroup splits keys per container, the
 * namespace per pod; at a level that does not use one it is zeroed, so the
 * counter map holds no more keys than the series exported. */
const volatile __u8 keep_cgroup = 1;
const volatile __u8 keep_netns = 1;
/* One RTT sample per connection per this many ns; 0 turns RTT sampling off. */
const volatile __u64 rtt_sample_ns = 1000000000ULL;

DEFINE_RINGBUF(tcp_events, 1 << 20);
EXPORT_BTF(struct tcp_event);
EXPORT_BTF(struct tcp_ckey);

/*
 * 1 when sock_ops is not attached: the tracepoints count `opened` and
 * `active` for tracked sockets. Set by user space before it attaches them.
 */
__u32 tp_counts_conns = 0;

/* What we know about one live socket. */
struct conn {
	__u64 start_ns;
	__u64 est_ns;
	__u64 last_rtt_ns;
	__u64 acked_base;	/* bytes_acked at ESTABLISHED (a client's SYN counts 1) */
	__u64 rcvd_base;
	__u8 saddr[16];
	__u8 caddr[16];
	__u16 sport;
	__u16 cport;
	__u32 pid;
	__u8 role;
	__u8 flags;
	__u8 pad[2];
	char comm[16];
	__u64 cgroup_id;	/* sock_cgroup_id(), read when the connection opens or closes */
	__u32 netns;
	__u32 pad2;
};

/*
 * Not an LRU: an evicted entry's close would come back untracked (and, in
 * the fallback without sock_ops, the connection would never leave
 * `active`). A plain hash refuses inserts when full instead (counted,
 * TCP_STAT_SOCKS_FULL): such a connection has no open/close/RTT records, so
 * every +1 of the fallback's `active` has its -1. Entries live from the
 * first SYN to CLOSE; every path to CLOSE passes inet_sock_set_state.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct conn);
} socks SEC(".maps");

/* SYN arrival per (remote address, ports), from sock_ops on the request sock. */
struct syn_key {
	__u8 raddr[16];
	__u16 lport;
	__u16 rport;
};

/*
 * The counter key a connection's `active` +1 went to, in the socket's own
 * storage (sock_ops): created at ESTABLISHED, read for the -1 and deleted at
 * CLOSE, freed with the socket. Exists exactly while the +1 stands.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct tcp_ckey);
} conn_keys SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct syn_key);
	__type(value, __u64);
} syn_times SEC(".maps");

/*
 * Counters per key, accumulated for one interval. Two tables: programs add
 * to the one `counters_active` names; once per interval user space flips it,
 * waits out programs in flight and drains the other with lookup-and-delete
 * (platform/tables.py), so no increment races a delete.
 */
__u32 counters_active = 0;

#define DEFINE_COUNTERS(name)						\
	struct {							\
		__uint(type, BPF_MAP_TYPE_HASH);			\
		__uint(max_entries, 16384);				\
		__type(key, struct tcp_ckey);				\
		__type(value, __u64);					\
	} name SEC(".maps")

DEFINE_COUNTERS(counters_a);
DEFINE_COUNTERS(counters_b);

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TCP_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} tcp_stats SEC(".maps");

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&tcp_stats, &idx);

	if (v)
		*v += 1;
}

/*
 * Tracepoint records are the program's ctx: the verifier rejects loads
 * through a ctx pointer with a computed offset and misaligned ctx loads, so
 * the address arrays are copied to the stack first.
 */
struct ends {
	__u8 laddr[16];
	__u8 raddr[16];
	__u16 lport;
	__u16 rport;
};

#define TP_ENDS(e, ctx)								\
	do {									\
		bpf_probe_read_kernel((e)->laddr, 16, &(ctx)->saddr_v6);	\
		bpf_probe_read_kernel((e)->raddr, 16, &(ctx)->daddr_v6);	\
		(e)->lport = (ctx)->sport;					\
		(e)->rport = (ctx)->dport;					\
	} while (0)

/* Without a tracked open, guess: the side with the lower port is the server. */
static __always_inline __u8 guess_role(__u16 lport, __u16 rport)
{
	return lport < rport ? TCP_ROLE_SERVER : TCP_ROLE_CLIENT;
}

/* Fill the server/client sides of a conn from local/remote endpoints. */
static __always_inline void set_ends(struct conn *c, const struct ends *e)
{
	if (c->role == TCP_ROLE_SERVER) {
		__builtin_memcpy(c->saddr, e->laddr, 16);
		__builtin_memcpy(c->caddr, e->raddr, 16);
		c->sport = e->lport;
		c->cport = e->rport;
	} else {
		__builtin_memcpy(c->caddr, e->laddr, 16);
		__builtin_memcpy(c->saddr, e->raddr, 16);
		c->cport = e->lport;
		c->sport = e->rport;
	}
}

/* Zero the key fields the user does not keep. */
static __always_inline void mask_key(struct tcp_ckey *k)
{
	if (!keep_saddr)
		__builtin_memset(k->saddr, 0, 16);
	if (!keep_caddr)
		__builtin_memset(k->caddr, 0, 16);
	if (!keep_sport)
		k->sport = 0;
	if (!keep_cport)
		k->cport = 0;
	if (!keep_cgroup)
		k->cgroup_id = 0;
	if (!keep_netns)
		k->netns = 0;
}

/* Add `n` under an already masked key; nonzero when the table was full (counted). */
static __always_inline int add_key(const struct tcp_ckey *k, __u64 n)
{
	__u64 zero = 0, *v;

	if (counters_active)
		v = lookup_or_try_init(&counters_b, k, &zero);
	else
		v = lookup_or_try_init(&counters_a, k, &zero);
	if (!v) {
		stat_inc(TCP_STAT_COUNTERS_FULL);
		return -1;
	}
	__sync_fetch_and_add(v, n);
	return 0;
}

static __always_inline void count_key(struct tcp_ckey *k, __u64 n)
{
	mask_key(k);
	add_key(k, n);
}

/* Server/client sides of a counter key from local/remote endpoints. */
static __always_inline void key_ends(struct tcp_ckey *k, const struct ends *e, __u8 role)
{
	k->role = role;
	if (role == TCP_ROLE_SERVER) {
		__builtin_memcpy(k->saddr, e->laddr, 16);
		__builtin_memcpy(k->caddr, e->raddr, 16);
		k->sport = e->lport;
		k->cport = e->rport;
	} else {
		__builtin_memcpy(k->caddr, e->laddr, 16);
		__builtin_memcpy(k->saddr, e->raddr, 16);
		k->cport = e->lport;
		k->sport = e->rport;
	}
}

/*
 * Count `n` of `kind` for socket `sk` (may be 0): the tracked entry gives
 * role and ends; otherwise the tracepoint's local/remote ends are used.
 */
static __always_inline void count_sock(__u64 sk, __u8 kind, __u64 n, const struct ends *ends,
				       __u8 role_if_unknown, __u8 flag)
{
	struct tcp_ckey k = {};
	struct conn *c = NULL;

	if (sk)
		c = bpf_map_lookup_elem(&socks, &sk);
	if (sk) {
		/* Whose connection: attributed to its pod/container in user space. */
		k.cgroup_id = keep_cgroup ? sock_cgroup_id((struct sock *)sk) : 0;
		k.netns = keep_netns ? sock_netns((struct sock *)sk) : 0;
	}
	if (c) {
		c->flags |= flag;
		__builtin_memcpy(k.saddr, c->saddr, 16);
		__builtin_memcpy(k.caddr, c->caddr, 16);
		k.sport = c->sport;
		k.cport = c->cport;
		k.role = c->role;
	} else {
		key_ends(&k, ends, role_if_unknown ? role_if_unknown :
			 guess_role(ends->lport, ends->rport));
	}
	k.kind = kind;
	count_key(&k, n);
}

/* Count `n` of `kind` under a tracked connection's key. */
static __always_inline void count_conn(const struct conn *c, __u8 kind, __u64 n)
{
	struct tcp_ckey k = {};

	__builtin_memcpy(k.saddr, c->saddr, 16);
	__builtin_memcpy(k.caddr, c->caddr, 16);
	k.sport = c->sport;
	k.cport = c->cport;
	k.role = c->role;
	k.kind = kind;
	k.cgroup_id = c->cgroup_id;	/* set at ESTABLISHED: opened, active +1 and -1 agree */
	k.netns = c->netns;
	count_key(&k, n);
}

static __always_inline void fill_event(struct tcp_event *e, const struct conn *c, __u8 kind,
				       __u64 now)
{
	e->ts_ns = now;
	e->start_ns = c->start_ns;
	e->est_ns = c->est_ns;
	__builtin_memcpy(e->saddr, c->saddr, 16);
	__builtin_memcpy(e->caddr, c->caddr, 16);
	e->sport = c->sport;
	e->cport = c->cport;
	e->pid = c->pid;
	e->kind = kind;
	e->role = c->role;
	e->flags = c->flags;
	__builtin_memcpy(e->comm, c->comm, 16);
	e->cgroup_id = c->cgroup_id;
	e->netns = c->netns;
}

static __always_inline void set_workload(struct conn *c, struct sock *sk)
{
	c->cgroup_id = keep_cgroup ? sock_cgroup_id(sk) : 0;
	c->netns = keep_netns ? sock_netns(sk) : 0;
}

static __always_inline void emit_open(const struct conn *c, struct tcp_sock *tp, __u64 now)
{
	struct tcp_event *e = RINGBUF_RESERVE(tcp_events, sizeof(*e));

	if (!e)
		return;
	__builtin_memset(e, 0, sizeof(*e));
	fill_event(e, c, TCP_EV_OPEN, now);
	e->srtt_us = BPF_CORE_READ(tp, srtt_us) >> 3;
	RINGBUF_SUBMIT(tcp_events, e);
}

static __always_inline void on_close(int old, const struct ends *ends, __u64 sk, __u64 now)
{
	struct tcp_sock *tp = (struct tcp_sock *)sk;
	struct sock *s = (struct sock *)sk;
	struct conn *c, tmp = {};
	struct tcp_event *e;
	__u64 acked, rcvd;
	int err;

	if (old == TCP_LISTEN || old == TCP_CLOSE)
		return;
	c = bpf_map_lookup_elem(&socks, &sk);
	if (tp_counts_conns && c && (c->flags & TCP_F_TRACKED) && c->est_ns)
		count_conn(c, TCP_CNT_ACTIVE, (__u64)-1);	/* the key its +1 went to */
	if (!c) {
		/* A connection older than the agent: report what the socket knows. */
		if (old == TCP_SYN_SENT || old == TCP_SYN_RECV || old == TCP_NEW_SYN_RECV)
			return;
		tmp.role = guess_role(ends->lport, ends->rport);
		tmp.flags = TCP_F_ROLE_GUESSED;
		c = &tmp;
	}
	/* Addresses as the socket has them now (a client's port is bound late). */
	set_ends(c, ends);
	if (!c->cgroup_id)
		set_workload(c, s);
	err = BPF_CORE_READ(s, sk_err);
	if (old == TCP_FIN_WAIT2 && !err && !(c->flags & TCP_F_RST_RX))
		c->flags |= TCP_F_FIN_RX;	/* FIN in FIN_WAIT2: straight to CLOSE */

	e = RINGBUF_RESERVE(tcp_events, sizeof(*e));
	if (e) {
		__builtin_memset(e, 0, sizeof(*e));
		fill_event(e, c, (c->flags & TCP_F_TRACKED) && !c->est_ns ? TCP_EV_FAIL : TCP_EV_CLOSE,
			   now);
		e->oldstate = old;
		e->cause = err > 0 && err < 256 ? err : 0;
		acked = BPF_CORE_READ(tp, bytes_acked);
		rcvd = BPF_CORE_READ(tp, bytes_received);
		/* bytes_acked/received count sequence space: SYN and FIN take one each. */
		acked -= c->acked_base;
		rcvd -= c->rcvd_base;
		if ((c->flags & TCP_F_FIN_TX) && acked &&
		    BPF_CORE_READ(tp, snd_una) == BPF_CORE_READ(tp, write_seq))
			acked -= 1;
		if ((c->flags & TCP_F_FIN_RX) && rcvd)
			rcvd -= 1;
		e->bytes_tx = acked;
		e->bytes_rx = rcvd;
		e->segs_out = BPF_CORE_READ(tp, segs_out);
		e->segs_in = BPF_CORE_READ(tp, segs_in);
		e->srtt_us = BPF_CORE_READ(tp, srtt_us) >> 3;
		e->retrans = BPF_CORE_READ(tp, total_retrans);
		RINGBUF_SUBMIT(tcp_events, e);
	}
	if (c != &tmp)
		bpf_map_delete_elem(&socks, &sk);
}

/*
 * Insert a new socket's entry. An entry already there belongs to a freed
 * socket whose close we never saw (the address was reused): take it out of
 * `active` now, so the gauge cannot drift up.
 */
static __always_inline void track(__u64 sk, const struct conn *init)
{
	struct conn *old = bpf_map_lookup_elem(&socks, &sk);

	if (old) {
		if (tp_counts_conns && (old->flags & TCP_F_TRACKED) && old->est_ns)
			count_conn(old, TCP_CNT_ACTIVE, (__u64)-1);
		stat_inc(TCP_STAT_STALE);
	}
	if (bpf_map_update_elem(&socks, &sk, init, BPF_ANY))
		stat_inc(TCP_STAT_SOCKS_FULL);
}

static __always_inline int on_client_connect(struct trace_event_raw_inet_sock_set_state *ctx,
					     __u64 sk)
{
	struct conn init = {};
	struct ends ends;

	/* connect(): process context, the caller owns the socket. */
	TP_ENDS(&ends, ctx);
	init.role = TCP_ROLE_CLIENT;
	init.flags = TCP_F_TRACKED;
	init.start_ns = bpf_ktime_get_ns();
	init.pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(init.comm, sizeof(init.comm));
	set_ends(&init, &ends);
	track(sk, &init);
	return 0;
}

static __always_inline int on_child(struct trace_event_raw_inet_sock_set_state *ctx, __u64 sk)
{
	struct syn_key k = {};
	struct conn init = {};
	struct ends ends;
	__u64 *t;

	/* The child is cloned from the listener at the final ACK. */
	TP_ENDS(&ends, ctx);
	init.role = TCP_ROLE_SERVER;
	init.flags = TCP_F_TRACKED;
	set_ends(&init, &ends);
	__builtin_memcpy(k.raddr, ends.raddr, 16);
	k.lport = ends.lport;
	k.rport = ends.rport;
	t = bpf_map_lookup_elem(&syn_times, &k);
	if (t) {
		init.start_ns = *t;
		bpf_map_delete_elem(&syn_times, &k);
	}
	track(sk, &init);
	return 0;
}

static __always_inline int on_established(struct trace_event_raw_inet_sock_set_state *ctx,
					  __u64 sk)
{
	struct tcp_sock *tp = (struct tcp_sock *)sk;
	struct conn *c = bpf_map_lookup_elem(&socks, &sk);
	struct ends ends;
	__u64 now;

	if (!c || c->est_ns)
		return 0;
	now = bpf_ktime_get_ns();
	TP_ENDS(&ends, ctx);
	c->est_ns = now;
	set_ends(c, &ends);	/* a client's port is bound after SYN_SENT */
	set_workload(c, (struct sock *)sk);
	c->acked_base = BPF_CORE_READ(tp, bytes_acked);
	c->rcvd_base = BPF_CORE_READ(tp, bytes_received);
	if (!c->start_ns) {
		/*
		 * No SYN stamp (sock_ops not attached, or the listener sits
		 * outside its cgroup): the SYN-ACK RTT the kernel just
		 * measured is the server's handshake time.
		 */
		__u32 srtt = BPF_CORE_READ(tp, srtt_us) >> 3;

		stat_inc(TCP_STAT_SYN_MISS);
		if (srtt) {
			c->start_ns = now - (__u64)srtt * 1000;
			c->flags |= TCP_F_SYN_FROM_SRTT;
		}
	}
	if (tp_counts_conns) {	/* fallback: sock_ops counts them otherwise */
		count_conn(c, TCP_CNT_OPENED, 1);
		count_conn(c, TCP_CNT_ACTIVE, 1);
	}
	emit_open(c, tp, now);
	return 0;
}

static __always_inline void set_flag(__u64 sk, __u8 flag)
{
	struct conn *c = bpf_map_lookup_elem(&socks, &sk);

	if (c)
		c->flags |= flag;
}

/* Work (clock reads, copies) happens only on the transitions that need it. */
SEC("tracepoint/sock/inet_sock_set_state")
int tcp_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	__u64 sk = (__u64)ctx->skaddr;
	int old = ctx->oldstate;
	struct ends ends;

	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	switch (ctx->newstate) {
	case TCP_SYN_SENT:
		return on_client_connect(ctx, sk);
	case TCP_SYN_RECV:
		return old == TCP_LISTEN ? on_child(ctx, sk) : 0;
	case TCP_ESTABLISHED:
		return on_established(ctx, sk);
	case TCP_FIN_WAIT1:
	case TCP_LAST_ACK:
		set_flag(sk, TCP_F_FIN_TX);
		return 0;
	case TCP_CLOSE_WAIT:
	case TCP_CLOSING:
		set_flag(sk, TCP_F_FIN_RX);
		return 0;
	case TCP_CLOSE:
		if (old == TCP_LISTEN || old == TCP_CLOSE)
			return 0;
		TP_ENDS(&ends, ctx);
		on_close(old, &ends, sk, bpf_ktime_get_ns());
		return 0;
	}
	return 0;
}

/* Segments in a (TSO/GSO) skb, as tcp_skb_pcount() and RetransSegs count them. */
static __always_inline __u64 skb_segs(struct sk_buff *skb)
{
	unsigned char *head = BPF_CORE_READ(skb, head);
	__u32 end = BPF_CORE_READ(skb, end);
	struct skb_shared_info *sh = (void *)(head + end);
	__u16 segs = BPF_CORE_READ(sh, gso_segs);

	return segs ? segs : 1;
}

SEC("tracepoint/tcp/tcp_retransmit_skb")
int tcp_retransmit(struct trace_event_raw_tcp_retransmit_skb *ctx)
{
	struct ends ends;
	int err = ctx->err;
	__u64 segs;

	/*
	 * Since 6.13 the tracepoint also fires when __tcp_retransmit_skb()
	 * gives up before sending: skb still in the host queue (-EBUSY, common
	 * on veth), trim/fragment failures, no route, no window. Those exits
	 * come before the kernel adds to RetransSegs; failures of the transmit
	 * itself (-ENOBUFS) come after it and are counted, as the kernel does.
	 */
	if (err == -EBUSY || err == -ENOMEM || err == -EINVAL || err == -EHOSTUNREACH ||
	    err == -EAGAIN)
		return 0;
	segs = skb_segs((struct sk_buff *)ctx->skbaddr);
	TP_ENDS(&ends, ctx);
	count_sock((__u64)ctx->skaddr, TCP_CNT_RETRANS_SEGS, segs, &ends, 0, 0);
	return 0;
}

/* Kernels before 6.10 / 6.13: struct trace_event_raw_tcp_event_sk_skb___old
 * (compat.bpf.h). */
SEC("tracepoint/tcp/tcp_retransmit_skb")
int tcp_retransmit_old(struct trace_event_raw_tcp_event_sk_skb___old *ctx)
{
	/* These kernels fire it only for a retransmission that was sent. */
	__u64 segs = skb_segs((struct sk_buff *)ctx->skbaddr);
	struct ends ends;

	TP_ENDS(&ends, ctx);
	count_sock((__u64)ctx->skaddr, TCP_CNT_RETRANS_SEGS, segs, &ends, 0, 0);
	return 0;
}

SEC("tracepoint/tcp/tcp_send_reset")
int tcp_send_reset_old(struct trace_event_raw_tcp_event_sk_skb___old *ctx)
{
	struct ends ends;

	/* These kernels trace only resets sent on behalf of a socket. */
	TP_ENDS(&ends, ctx);
	count_sock((__u64)ctx->skaddr, TCP_CNT_RESET_TX, 1, &ends, 0, TCP_F_RST_TX);
	return 0;
}

SEC("tracepoint/tcp/tcp_retransmit_synack")
int tcp_retransmit_synack(struct trace_event_raw_tcp_retransmit_synack *ctx)
{
	struct ends ends;

	/* The listener's side of a half-open connection: always the server. */
	TP_ENDS(&ends, ctx);
	count_sock(0, TCP_CNT_RETRANS_SEGS, 1, &ends, TCP_ROLE_SERVER, 0);
	return 0;
}

/* The reset tracepoint carries sockaddr_in / sockaddr_in6 images (copied
 * to the stack first); IPv4 becomes v4-mapped like everywhere else. */
static __always_inline void sockaddr_end(const __u8 *sa, __u8 *addr, __u16 *port)
{
	__u16 family = *(const __u16 *)sa;

	*port = bpf_ntohs(*(const __u16 *)(sa + 2));
	if (family == AF_INET6) {
		__builtin_memcpy(addr, sa + 8, 16);
	} else {
		__builtin_memset(addr, 0, 10);
		addr[10] = 0xff;
		addr[11] = 0xff;
		__builtin_memcpy(addr + 12, sa + 4, 4);
	}
}

SEC("tracepoint/tcp/tcp_send_reset")
int tcp_send_reset(struct trace_event_raw_tcp_send_reset *ctx)
{
	__u8 sa[28] __attribute__((aligned(8)));
	__u64 sk = (__u64)ctx->skaddr;
	struct ends ends;

	bpf_probe_read_kernel(sa, sizeof(sa), &ctx->saddr);
	sockaddr_end(sa, ends.laddr, &ends.lport);
	bpf_probe_read_kernel(sa, sizeof(sa), &ctx->daddr);
	sockaddr_end(sa, ends.raddr, &ends.rport);
	/* No socket: the reset answers a segment nobody listens for. */
	count_sock(sk, TCP_CNT_RESET_TX, 1, &ends, sk ? 0 : TCP_ROLE_SERVER, TCP_F_RST_TX);
	return 0;
}

SEC("tracepoint/tcp/tcp_receive_reset")
int tcp_receive_reset(struct trace_event_raw_tcp_event_sk *ctx)
{
	struct ends ends;

	TP_ENDS(&ends, ctx);
	count_sock((__u64)ctx->skaddr, TCP_CNT_RESET_RX, 1, &ends, 0, TCP_F_RST_RX);
	return 0;
}

/* accept() returned fd: find its struct sock and name the owner. */
static __always_inline int on_accept(long fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct file **fds, *f = NULL;
	struct socket *sock;
	unsigned int max;
	struct conn *c;
	__u64 sk;

	if (fd < 0)
		return 0;
	fds = BPF_CORE_READ(task, files, fdt, fd);
	max = BPF_CORE_READ(task, files, fdt, max_fds);
	if (!fds || fd >= max)
		return 0;
	if (bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]) || !f)
		return 0;
	sock = BPF_CORE_READ(f, private_data);
	if (!sock)
		return 0;
	sk = (__u64)BPF_CORE_READ(sock, sk);
	c = bpf_map_lookup_elem(&socks, &sk);
	if (!c || c->role != TCP_ROLE_SERVER || c->pid)
		return 0;
	c->pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(c->comm, sizeof(c->comm));
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_accept4")
int tcp_accept4(struct trace_event_raw_sys_exit *ctx)
{
	return on_accept(ctx->ret);
}

SEC("tracepoint/syscalls/sys_exit_accept")
int tcp_accept(struct trace_event_raw_sys_exit *ctx)
{
	return on_accept(ctx->ret);
}

/* IPv4 as the tracepoints store it: v4-mapped. */
static __always_inline void v4_mapped(__u8 *out, __u32 v4)
{
	__builtin_memset(out, 0, 10);
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(out + 12, &v4, 4);
}

/*
 * A sock_ops address: all fields read unconditionally at constant offsets
 * (barrier_var pins each load), because clang otherwise merges the IPv4 and
 * IPv6 loads into one through a computed ctx offset, which the verifier
 * refuses.
 */
#define SOCKOPS_ADDR(out, skops, ip4, ip6)					\
	do {									\
		__u32 __a[4], __v4 = (skops)->ip4;				\
		__u32 __fam = (skops)->family;					\
										\
		__a[0] = (skops)->ip6[0];					\
		__a[1] = (skops)->ip6[1];					\
		__a[2] = (skops)->ip6[2];					\
		__a[3] = (skops)->ip6[3];					\
		barrier_var(__v4);						\
		barrier_var(__a[0]);						\
		barrier_var(__a[1]);						\
		barrier_var(__a[2]);						\
		barrier_var(__a[3]);						\
		if (__fam == AF_INET6)						\
			__builtin_memcpy(out, __a, 16);				\
		else								\
			v4_mapped(out, __v4);					\
	} while (0)

/*
 * A connection reached ESTABLISHED (role exact: active open = client): count
 * it opened and active under one key, and keep that key on the socket for
 * its -1. The storage exists exactly while the +1 stands.
 */
static __always_inline void sockops_open(struct bpf_sock_ops *skops, __u8 role)
{
	struct bpf_sock *bsk = skops->sk;
	struct tcp_ckey k = {};
	struct tcp_sock *tp;
	struct ends e;

	if (!bsk || bpf_sk_storage_get(&conn_keys, bsk, 0, 0))
		return;	/* counted already */
	SOCKOPS_ADDR(e.laddr, skops, local_ip4, local_ip6);
	SOCKOPS_ADDR(e.raddr, skops, remote_ip4, remote_ip6);
	e.lport = skops->local_port;
	e.rport = bpf_ntohl(skops->remote_port);
	key_ends(&k, &e, role);
	/* The same reads as the tracepoints' keys (workload.bpf.h). */
	tp = (keep_cgroup || keep_netns) ? bpf_skc_to_tcp_sock(bsk) : NULL;
	if (tp) {
		k.cgroup_id = keep_cgroup ? sock_cgroup_id((struct sock *)tp) : 0;
		k.netns = keep_netns ? sock_netns((struct sock *)tp) : 0;
	}
	mask_key(&k);
	k.kind = TCP_CNT_OPENED;
	add_key(&k, 1);
	k.kind = TCP_CNT_ACTIVE;
	if (!bpf_sk_storage_get(&conn_keys, bsk, &k, BPF_SK_STORAGE_GET_F_CREATE)) {
		stat_inc(TCP_STAT_STORAGE_FAIL);	/* not in active: no -1 either */
		return;
	}
	if (add_key(&k, 1))	/* +1 lost (counted): no -1 either */
		bpf_sk_storage_delete(&conn_keys, bsk);
}

/* CLOSE: -1 to the key the +1 went to, if it went anywhere. */
static __always_inline void sockops_close(struct bpf_sock_ops *skops)
{
	struct bpf_sock *bsk = skops->sk;
	struct tcp_ckey *stored, k;

	if (!bsk)
		return;
	stored = bpf_sk_storage_get(&conn_keys, bsk, 0, 0);
	if (!stored)
		return;	/* older than the agent, or never counted */
	__builtin_memcpy(&k, stored, sizeof(k));
	bpf_sk_storage_delete(&conn_keys, bsk);
	add_key(&k, (__u64)-1);
}

/*
 * Per-CPU front slots of the RTT gate (sock_ops RTT_CB), indexed by the
 * socket's sk_txhash (random per connection): the connection a slot last saw
 * (txhash and ports; a rehash only costs a miss) and when its next sample is
 * due, copied from its socks entry. Only ever says "not due yet" when the entry says so too (an
 * entry's due time only moves later), so the samples are those the entry
 * alone would give.
 */
#define RTT_SLOTS 64

struct rtt_slot {
	__u32 txhash;
	__u32 ports;
	__u64 due_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RTT_SLOTS);
	__type(key, __u32);
	__type(value, struct rtt_slot);
} rtt_front SEC(".maps");

SEC("sockops")
int tcp_sockops(struct bpf_sock_ops *skops)
{
	__u32 op = skops->op;
	__u64 now;

	if (op == BPF_SOCK_OPS_TIMEOUT_INIT) {
		struct syn_key k = {};

		/* On the request sock, in tcp_conn_request: a SYN just arrived.
		 * reply stays 0, so the kernel keeps its default timeout. */
		if (skops->is_fullsock)
			return 1;
		SOCKOPS_ADDR(k.raddr, skops, remote_ip4, remote_ip6);
		k.lport = skops->local_port;
		k.rport = bpf_ntohl(skops->remote_port);
		now = bpf_ktime_get_ns();
		bpf_map_update_elem(&syn_times, &k, &now, BPF_ANY);
		return 1;
	}
	if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB ||
	    op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		__u32 flags = skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG;

		if (rtt_sample_ns)
			flags |= BPF_SOCK_OPS_RTT_CB_FLAG;
		bpf_sock_ops_cb_flags_set(skops, flags);
		sockops_open(skops, op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB ? TCP_ROLE_CLIENT :
				    TCP_ROLE_SERVER);
		return 1;
	}
	if (op == BPF_SOCK_OPS_STATE_CB) {
		if (skops->args[1] == TCP_CLOSE)
			sockops_close(skops);
		return 1;
	}
	if (op == BPF_SOCK_OPS_RTT_CB) {
		struct bpf_sock *bsk = skops->sk;
		struct rtt_slot *slot;
		struct tcp_event *e;
		struct conn *c;
		__u32 idx, txhash, ports;
		__u64 key;

		if (!bsk)
			return 1;
		now = bpf_ktime_get_ns();
		/* The RTT callback runs on every ACK that yields an RTT estimate;
		 * most find no sample due. This CPU's front slot remembers when the
		 * connection's next one is, so those return before the socks lookup. */
		txhash = skops->sk_txhash;
		ports = skops->local_port ^ skops->remote_port;
		idx = txhash & (RTT_SLOTS - 1);
		slot = bpf_map_lookup_elem(&rtt_front, &idx);
		if (slot && slot->txhash == txhash && slot->ports == ports && now < slot->due_ns)
			return 1;
		key = (__u64)bsk;
		c = bpf_map_lookup_elem(&socks, &key);
		if (!c) {
			/* Not tracked now, so never (entries are made at SYN time). */
			if (slot)
				*slot = (struct rtt_slot){ txhash, ports, now + rtt_sample_ns };
			return 1;
		}
		/* Bounded cost: at most one sample per connection per period. */
		if (c->last_rtt_ns && now - c->last_rtt_ns < rtt_sample_ns) {
			if (slot)
				*slot = (struct rtt_slot){ txhash, ports,
							   c->last_rtt_ns + rtt_sample_ns };
			return 1;
		}
		c->last_rtt_ns = now;
		if (slot)
			*slot = (struct rtt_slot){ txhash, ports, now + rtt_sample_ns };
		e = RINGBUF_RESERVE(tcp_events, sizeof(*e));
		if (!e)
			return 1;
		__builtin_memset(e, 0, sizeof(*e));
		fill_event(e, c, TCP_EV_RTT, now);
		e->srtt_us = skops->srtt_us >> 3;
		RINGBUF_SUBMIT(tcp_events, e);
	}
	return 1;
}
