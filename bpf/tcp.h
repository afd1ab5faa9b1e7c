/* SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause */
/* Records of the TCP health signal, read by both clang and cffi: fixed-width
 * types, explicit padding, no bitfields, no includes. Addresses are always
 * 16 bytes, IPv4 stored v4-mapped (::ffff:a.b.c.d) as the tracepoints do. */
#ifndef EBPF_OTLP_TCP_H
#define EBPF_OTLP_TCP_H

/* tcp_event.kind */
#define TCP_EV_OPEN 1	/* handshake completed (ESTABLISHED) */
#define TCP_EV_CLOSE 2	/* an established connection reached CLOSE */
#define TCP_EV_FAIL 3	/* a client handshake ended in CLOSE without ESTABLISHED */
#define TCP_EV_RTT 4	/* one sampled smoothed RTT of a live connection */

/* roles (tcp_event.role, tcp_ckey.role) */
#define TCP_ROLE_CLIENT 1
#define TCP_ROLE_SERVER 2

/* tcp_event.flags */
#define TCP_F_TRACKED 1	/* we saw the open: start/est times valid, counted as opened */
#define TCP_F_RST_RX 2	/* a reset was received on this connection */
#define TCP_F_RST_TX 4	/* a reset was sent on this connection */
#define TCP_F_FIN_TX 8	/* we sent a FIN */
#define TCP_F_FIN_RX 16	/* the peer's FIN arrived */
#define TCP_F_ROLE_GUESSED 32	/* role inferred from ports (connection older than the agent) */
#define TCP_F_SYN_FROM_SRTT 64	/* server handshake estimated from the SYN-ACK RTT */

/* tcp_ckey.kind: counters aggregated in the kernel */
#define TCP_CNT_RETRANS_SEGS 1
#define TCP_CNT_RESET_TX 2
#define TCP_CNT_RESET_RX 3
#define TCP_CNT_OPENED 4	/* handshakes that reached ESTABLISHED */
#define TCP_CNT_ACTIVE 5	/* gauge delta: +1 at ESTABLISHED, -1 (as u64) at CLOSE */

/* tcp_stats indexes (per-CPU array of drop/health counters) */
#define TCP_STAT_COUNTERS_FULL 0	/* counter map full: increment lost */
#define TCP_STAT_SOCKS_FULL 1	/* socket table full: no per-connection records for it */
#define TCP_STAT_SYN_MISS 2	/* server handshake without a recorded SYN time */
#define TCP_STAT_STALE 3	/* entry of a freed socket found at reuse (its close was missed) */
#define TCP_STAT_STORAGE_FAIL 4	/* sock_ops: no socket storage, connection left out of active */
#define TCP_STAT_MAX 5

struct tcp_event {
	__u64 ts_ns;		/* event time, CLOCK_MONOTONIC */
	__u64 start_ns;		/* SYN sent (client) / SYN received (server); 0 unknown */
	__u64 est_ns;		/* ESTABLISHED; 0 never */
	__u64 bytes_tx;		/* payload bytes sent and acknowledged */
	__u64 bytes_rx;		/* payload bytes received */
	__u8 saddr[16];		/* server address */
	__u8 caddr[16];		/* client address */
	__u32 segs_out;
	__u32 segs_in;
	__u32 srtt_us;		/* smoothed RTT (RTT events: the sample) */
	__u32 retrans;		/* total retransmitted segments */
	__u32 pid;		/* owner's tgid; 0 unknown */
	__u16 sport;		/* server port */
	__u16 cport;		/* client port */
	__u8 kind;		/* TCP_EV_* */
	__u8 role;		/* TCP_ROLE_* */
	__u8 cause;		/* FAIL: sk_err (errno) at close */
	__u8 flags;		/* TCP_F_* */
	__u8 oldstate;		/* state before CLOSE */
	__u8 pad[3];
	char comm[16];		/* owner's executable name */
	__u64 cgroup_id;	/* the socket's cgroup v2 id; 0 unknown */
	__u32 netns;		/* inode of the socket's network namespace; 0 unknown */
	__u32 pad2;
};

/* Key of the in-kernel counters; fields the user does not keep are zeroed
 * in the kernel so the map stays bounded by what is exported. */
struct tcp_ckey {
	__u8 saddr[16];
	__u8 caddr[16];
	__u16 sport;
	__u16 cport;
	__u8 kind;		/* TCP_CNT_* */
	__u8 role;
	__u8 pad[2];
	__u32 netns;		/* the socket's network namespace; 0 without a socket */
	__u64 cgroup_id;	/* the socket's cgroup v2 id; 0 without a socket */
};

#endif
