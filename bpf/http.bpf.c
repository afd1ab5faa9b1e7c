// SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause
/* HTTP capture without kprobes: socket tracepoints (or, on kernels without
 * them, the syscall exit) for plaintext sockets, uprobes on the TLS library's
 * SSL_read/SSL_write for encrypted ones.
 *
 * Plaintext, socket mode (kernels with sock:sock_{send,recv}_length, 6.3+):
 * two raw tracepoints that fire inside each send and receive on a socket,
 * with the struct sock, in the calling process. The buffer comes from the
 * syscall's saved registers; only calls made by a read/write-family syscall
 * on that very socket go further. Unlike a syscall hook, no other syscall
 * on the host pays for it (bench/http_syscalls.py). Per-connection state is
 * kept by struct sock and deleted when the connection reaches TCP_CLOSE
 * (sock:inet_sock_set_state), which also ends what user space has pending.
 *
 * Plaintext, syscall mode (older kernels): one raw tracepoint on every
 * syscall's return picks out the read/write family by number and reads the
 * arguments from the saved registers. The fd is classified once (task->files
 * -> struct file -> socket -> sock, cached per pid+fd until close, with the
 * socket's addresses), and only TCP sockets go further.
 *
 * Either way the first bytes decide: a request line or `HTTP/1.` marks the
 * connection as HTTP and produces a record; other bytes on a connection not
 * yet marked cost a few instructions and no record.
 *
 * TLS: an SSL call in progress on a thread is remembered; the socket calls it
 * makes underneath name its socket (so the 5-tuple is known) and are not
 * reported themselves (they carry ciphertext); the socket is then marked TLS
 * so its other calls are skipped too. On the call's return the plaintext
 * buffer is copied like a syscall's.
 *
 * Parsing, pairing and roles are user space's job (signals/http). */
#include "common.bpf.h"
#include "http.h"
#include "workload.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define MSG_PEEK 2
#define HTTP_FIXED_BYTES __builtin_offsetof(struct http_event, head)

/* Bytes of each call copied into the record (1..HTTP_HEAD_MAX); sizes the records. */
const volatile __u32 head_bytes = 256;
/* The agent's own process: its OTLP requests are HTTP too, and must not feed back. */
const volatile __u32 self_tgid = 0;
/* Whose call (--attribution): the caller's cgroup (the container) and the
 * socket's namespace (the pod); left 0 at a level that does not use them. */
const volatile __u8 keep_cgroup = 1;
const volatile __u8 keep_netns = 1;

DEFINE_RINGBUF(http_events, 4 << 20);
EXPORT_BTF(struct http_event);

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, HTTP_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} http_stats SEC(".maps");

struct fd_key {
	__u32 pid;
	__s32 fd;
};

#define FD_TCP 1	/* a TCP socket (IPv4 or IPv6) */
#define FD_HTTP 2	/* has carried an HTTP message head */
#define FD_TLS 4	/* used under an SSL call: its syscalls carry ciphertext */
#define FD_ADDR 8	/* addresses and netns below read from the socket */

struct fd_state {
	__u64 sk;
	__u32 flags;
	__u32 netns;		/* FD_ADDR: the socket's, cached with the addresses */
	__u8 laddr[16];
	__u8 raddr[16];
	__u16 lport;
	__u16 rport;
	__u8 family;
	__u8 pad[3];
	__u32 pid;		/* by socket: the last process that moved bytes on it, */
	__u32 tid;		/* and the fd it used (sys_sock's check is skipped while */
	__s32 fd;		/* the same process uses the same fd) */
	__u32 told;		/* the last process whose name and cgroup a record carried */
};

/* The classification of each pid+fd, dropped on close() (syscall mode). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct fd_key);
	__type(value, struct fd_state);
} http_fds SEC(".maps");

/* Connections by struct sock address: plaintext HTTP ones in socket mode,
 * TLS ones in both modes. Deleted at TCP_CLOSE, before the sock can be freed
 * and its address reused. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct fd_state);
} http_conns SEC(".maps");

/* An SSL call between entry and return. */
struct call {
	__u64 buf;		/* user buffer (first iovec for the vector calls) */
	__u64 sk;
	__u64 start_ns;
	__u64 ssl;		/* SSL calls: the SSL* */
	__u64 outlen;		/* SSL_*_ex: where the byte count is written */
	__u32 buflen;		/* bytes valid at buf (the first iovec's length) */
	__s32 fd;
	__u8 op;
	__u8 pad[7];
};

/* SSL calls in flight, by thread. LRU: a thread that dies inside a call
 * leaves its entry behind; LRU lets such entries go instead of filling the map. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct call);
} ssl_calls SEC(".maps");

struct ssl_key {
	__u64 ssl;
	__u32 pid;
	__u32 pad;
};

/* The socket (struct sock) each SSL* was last seen using (SSL_read can be
 * served from OpenSSL's buffer without a socket call). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ssl_key);
	__type(value, __u64);
} ssl_fds SEC(".maps");

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *n = bpf_map_lookup_elem(&http_stats, &idx);

	if (n)
		*n += 1;
}

/* The sock behind `fd` of the current task if it is a TCP socket, else 0. */
static __always_inline __u64 tcp_sock_of(int fd)
{
	struct task_struct *task = (void *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds, *file;
	struct socket *sock;
	struct sock *sk;
	umode_t mode;
	__u16 family;

	if (!fdt || fd < 0 || fd >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	fds = BPF_CORE_READ(fdt, fd);
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return 0;
	mode = BPF_CORE_READ(file, f_inode, i_mode);
	if ((mode & S_IFMT) != S_IFSOCK)
		return 0;
	sock = BPF_CORE_READ(file, private_data);
	if (!sock)
		return 0;
	sk = BPF_CORE_READ(sock, sk);
	if (!sk)
		return 0;
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return 0;
	if (BPF_CORE_READ(sk, sk_type) != SOCK_STREAM ||
	    BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	return (__u64)sk;
}

/* The cached classification of pid+fd, made on first sight. */
static __always_inline struct fd_state *fd_lookup(__u32 pid, int fd)
{
	struct fd_key k = { .pid = pid, .fd = fd };
	struct fd_state *st = bpf_map_lookup_elem(&http_fds, &k);
	struct fd_state init = {};

	if (st)
		return st;
	init.sk = tcp_sock_of(fd);
	init.flags = init.sk ? FD_TCP : 0;
	if (bpf_map_update_elem(&http_fds, &k, &init, BPF_ANY)) {
		stat_inc(HTTP_STAT_FD_UNTRACKED);
		return NULL;
	}
	return bpf_map_lookup_elem(&http_fds, &k);
}

/* The http_conns entry of socket `sk`, made with `flags` when missing. */
static __always_inline struct fd_state *conn_get(__u64 sk, __u32 flags)
{
	struct fd_state *st = bpf_map_lookup_elem(&http_conns, &sk);
	struct fd_state init = {};

	if (st)
		return st;
	init.sk = sk;
	init.flags = FD_TCP | flags;
	init.fd = -1;
	bpf_map_update_elem(&http_conns, &sk, &init, BPF_NOEXIST);
	st = bpf_map_lookup_elem(&http_conns, &sk);
	if (!st)
		stat_inc(HTTP_STAT_FD_UNTRACKED);
	return st;
}

/* Whether a buffer starts like an HTTP/1.x request line or status line. */
static __always_inline bool http_start(const void *ubuf, __u32 n)
{
	__u8 b[8] = {};
	__u32 w;

	if (n < 4 || bpf_probe_read_user(b, n < 8 ? 4 : 8, ubuf))
		return false;
	w = b[0] | (b[1] << 8) | (b[2] << 16) | ((__u32)b[3] << 24);
#define W(a, b_, c, d) ((a) | ((b_) << 8) | ((c) << 16) | ((__u32)(d) << 24))
	switch (w) {
	case W('G', 'E', 'T', ' '):
	case W('P', 'O', 'S', 'T'):
	case W('P', 'U', 'T', ' '):
	case W('H', 'E', 'A', 'D'):
	case W('D', 'E', 'L', 'E'):
	case W('P', 'A', 'T', 'C'):
	case W('O', 'P', 'T', 'I'):
	case W('C', 'O', 'N', 'N'):
	case W('T', 'R', 'A', 'C'):
		return true;
	case W('H', 'T', 'T', 'P'):
		return n >= 8 && b[4] == '/' && b[5] == '1' && b[6] == '.';
	}
#undef W
	return false;
}

/* The socket's addresses and namespace, read once per fd: a connection's
 * do not change while the fd names it. Read at the first record rather
 * than at classification, when a connect may not have set them yet. */
static __always_inline void cache_addrs(struct fd_state *st)
{
	struct sock *sk = (void *)st->sk;
	__u16 family;

	st->flags |= FD_ADDR;
	if (!sk)
		return;
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	st->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	st->rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (family == AF_INET) {
		/* IPv4-mapped, as in every record header (bpf/pkt.bpf.h) */
		__builtin_memset(st->laddr, 0, 16);
		__builtin_memset(st->raddr, 0, 16);
		st->family = 4;
		st->laddr[10] = st->laddr[11] = 0xff;
		st->raddr[10] = st->raddr[11] = 0xff;
		bpf_core_read(st->laddr + 12, 4, &sk->__sk_common.skc_rcv_saddr);
		bpf_core_read(st->raddr + 12, 4, &sk->__sk_common.skc_daddr);
	} else {
		st->family = 6;
		bpf_core_read(st->laddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
		bpf_core_read(st->raddr, 16, &sk->__sk_common.skc_v6_daddr);
	}
	if (keep_netns)
		st->netns = sock_netns(sk);
}

static __always_inline void emit(__u8 op, __u8 tls, __u64 id, int fd, struct fd_state *st,
				 __u64 start, __u32 len, const void *buf, __u32 avail)
{
	__u32 size = HTTP_FIXED_BYTES + ((head_bytes + 7) & ~7U);
	struct http_event *e;

	if (!(st->flags & FD_ADDR))
		cache_addrs(st);
	e = RINGBUF_RESERVE(http_events, size);
	if (!e)
		return;
	__builtin_memset(e, 0, HTTP_FIXED_BYTES);
	e->start_ns = start;
	e->end_ns = bpf_ktime_get_ns();
	e->conn = st->sk;
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->fd = fd;
	e->len = len;
	e->op = op;
	e->tls = tls;
	if (st->sk) {
		e->family = st->family;
		e->lport = st->lport;
		e->rport = st->rport;
		__builtin_memcpy(e->laddr, st->laddr, 16);
		__builtin_memcpy(e->raddr, st->raddr, 16);
		e->netns = st->netns;
	}
	/* The caller's name and cgroup on a process's first record on the
	 * connection only (user space keeps them per process): 0.8 us less BPF
	 * time per keep-alive request (bench/http_load.py, hooks alone). CLOSE
	 * often runs in softirq, in no process of the connection's. */
	if (op != HTTP_OP_CLOSE && st->told != e->pid) {
		st->told = e->pid;
		e->ids = 1;
		bpf_get_current_comm(e->comm, sizeof(e->comm));
		if (keep_cgroup)
			e->cgroup_id = bpf_get_current_cgroup_id();
	}
	/* The verifier needs the length proved within [1, head_bytes]; see
	 * dns.bpf.c for why the test is `n < 1` behind an empty asm. */
	{
		__u32 want = avail < len ? avail : len;
		__s64 n;

		if (want > head_bytes)
			want = head_bytes;
		n = want & 0x7ff;

		asm volatile("" : "+r"(n));
		if (n > head_bytes)
			n = head_bytes;
		if (n < 1 || !buf)
			n = 0;
		else if (bpf_probe_read_user(e->head, n, buf)) {
			stat_inc(HTTP_STAT_READ_FAILED);
			n = 0;
		}
		e->head_len = n;
	}
	/* the reserved size, not sizeof(*e) (HTTP_HEAD_MAX): one wake-up per
	 * ringbuf_wakeup_bytes really queued */
	ringbuf_submit_batched(&http_events, e, size);
}

/* --- syscalls ------------------------------------------------------------ */

/* One raw tracepoint on every syscall's return instead of a tracepoint pair
 * per syscall: the arguments are still in the saved registers there, so no
 * entry program and no table of calls in flight are needed (an entry program
 * plus that table's insert and delete were half of the BPF time per request,
 * bench/http_load.py). Numbers are x86-64's; 32-bit (compat) calls are
 * skipped like the syscall tracepoints skip them. */
#ifndef __TARGET_ARCH_x86
#error "the syscall numbers below are x86-64's"
#endif
#define NR_read 0
#define NR_write 1
#define NR_close 3
#define NR_readv 19
#define NR_writev 20
#define NR_sendfile 40
#define NR_sendto 44
#define NR_recvfrom 45
#define NR_sendmsg 46
#define NR_recvmsg 47
#define NR_splice 275
#define TS_COMPAT 0x0002
#define EBADF 9

/* Bytes received by splice() out of a socket: counted like a read, no head. */
#define OP_SPLICE_IN 16

/* A read/write-family call on `fd` returned `ret` having moved data at `buf`
 * (`buflen` bytes there). True when fd is a TCP socket this program follows. */
static __always_inline bool sys_data(__u64 id, int fd, __u64 buf, __u32 buflen, __u8 op,
				     long ret)
{
	struct fd_state *st;
	struct call *ssl;
	__u64 now;
	__u32 n;

	if (fd < 0)
		return false;
	st = fd_lookup(id >> 32, fd);
	if (!st || !(st->flags & FD_TCP))
		return false;
	ssl = bpf_map_lookup_elem(&ssl_calls, &id);
	if (ssl && ssl->op) {	/* underneath SSL_read/SSL_write: ciphertext on this fd */
		ssl->fd = fd;
		ssl->sk = st->sk;
		st->flags |= FD_TLS;
		return true;
	}
	if (st->flags & FD_TLS)
		return true;
	if ((op == HTTP_OP_SENDFILE || op == OP_SPLICE_IN) && !(st->flags & FD_HTTP))
		return false;
	now = bpf_ktime_get_ns();
	if (ret == 0 && op == HTTP_OP_READ && (st->flags & FD_HTTP)) {
		emit(HTTP_OP_EOF, 0, id, fd, st, now, 0, NULL, 0);
		return true;
	}
	if (ret <= 0)
		return true;
	n = ret > 0x7fffffff ? 0x7fffffff : ret;
	if (op == HTTP_OP_SENDFILE || op == OP_SPLICE_IN) {
		emit(op == OP_SPLICE_IN ? HTTP_OP_READ : HTTP_OP_SENDFILE, 0, id, fd, st, now, n,
		     NULL, 0);
		return true;
	}
	if (!(st->flags & FD_HTTP)) {
		if (!http_start((void *)buf, n < buflen ? n : buflen))
			return true;
		st->flags |= FD_HTTP;
	}
	emit(op, 0, id, fd, st, now, n, (void *)buf, buflen);
	return true;
}

struct iovec_u {
	__u64 base;
	__u64 len;
};

/* The first iovec of a vector: the bytes a message head starts in. */
static __always_inline void first_iov(const void *vec, __u64 *buf, __u32 *len)
{
	struct iovec_u iov = {};

	if (vec && bpf_probe_read_user(&iov, sizeof(iov), vec))
		iov.base = iov.len = 0;
	*buf = iov.base;
	*len = iov.len > 0xffffffff ? 0xffffffff : iov.len;
}

static __always_inline void first_msg_iov(const void *msg, __u64 *buf, __u32 *len)
{
	struct user_msghdr m = {};

	*buf = 0;
	*len = 0;
	if (!msg || bpf_probe_read_user(&m, sizeof(m), msg) || m.msg_iovlen < 1)
		return;
	first_iov(m.msg_iov, buf, len);
}

/* close(fd): forget the fd; a connection that carried HTTP gets a record so
 * user space ends what is pending on it. */
static __always_inline int sys_close(__u64 id, int fd, long ret)
{
	struct fd_key k = { .pid = id >> 32, .fd = fd };
	struct fd_state *st;

	if (ret == -EBADF)
		return 0;
	st = bpf_map_lookup_elem(&http_fds, &k);
	if (!st)
		return 0;
	if (st->flags & FD_HTTP)
		emit(HTTP_OP_CLOSE, !!(st->flags & FD_TLS), id, fd, st, bpf_ktime_get_ns(), 0,
		     NULL, 0);
	bpf_map_delete_elem(&http_fds, &k);
	return 0;
}

SEC("raw_tracepoint/sys_exit")
int http_sys_exit(struct bpf_raw_tracepoint_args *ctx)
{
	struct pt_regs *regs = (void *)ctx->args[0];
	long ret = ctx->args[1];
	long nr = BPF_CORE_READ(regs, orig_ax);
	struct task_struct *task;
	__u64 id, buf = 0;
	__u32 len = 0;
	int fd;
	__u8 op;

	switch (nr) {
	case NR_read: case NR_readv: case NR_recvfrom: case NR_recvmsg:
		op = HTTP_OP_READ;
		break;
	case NR_write: case NR_writev: case NR_sendto: case NR_sendmsg:
		op = HTTP_OP_WRITE;
		break;
	case NR_sendfile: case NR_splice: case NR_close:
		op = 0;
		break;
	default:
		return 0;
	}
	id = bpf_get_current_pid_tgid();
	if ((id >> 32) == self_tgid)
		return 0;
	task = (void *)bpf_get_current_task();
	if (BPF_CORE_READ(task, thread_info.status) & TS_COMPAT)
		return 0;
	fd = PT_REGS_PARM1_CORE_SYSCALL(regs);
	switch (nr) {
	case NR_close:
		return sys_close(id, fd, ret);
	case NR_sendfile:
		sys_data(id, fd, 0, 0, HTTP_OP_SENDFILE, ret);
		return 0;
	case NR_splice:	/* into a socket: body bytes sent; out of one: received */
		if (!sys_data(id, PT_REGS_PARM3_CORE_SYSCALL(regs), 0, 0, HTTP_OP_SENDFILE, ret))
			sys_data(id, fd, 0, 0, OP_SPLICE_IN, ret);
		return 0;
	case NR_recvfrom:	/* MSG_PEEK reads bytes a later call reads again */
		if (PT_REGS_PARM4_CORE_SYSCALL(regs) & MSG_PEEK)
			return 0;
		/* fallthrough */
	case NR_read: case NR_write: case NR_sendto:
		buf = PT_REGS_PARM2_CORE_SYSCALL(regs);
		len = PT_REGS_PARM3_CORE_SYSCALL(regs);
		break;
	case NR_readv: case NR_writev:
		first_iov((void *)PT_REGS_PARM2_CORE_SYSCALL(regs), &buf, &len);
		break;
	case NR_recvmsg:
		if (PT_REGS_PARM3_CORE_SYSCALL(regs) & MSG_PEEK)
			return 0;
		/* fallthrough */
	case NR_sendmsg:
		first_msg_iov((void *)PT_REGS_PARM2_CORE_SYSCALL(regs), &buf, &len);
		break;
	}
	sys_data(id, fd, buf, len, op, ret);
	return 0;
}

/* --- socket tracepoints (socket mode) ------------------------------------ */

#define PF_KTHREAD 0x00200000
#define TCP_CLOSE 7

/* A send (`op` WRITE) or receive (READ) on socket `sk` returned `ret`, inside
 * the current task's syscall. */
static __always_inline int sock_call(__u64 sk, long ret, int flags, __u8 op)
{
	struct task_struct *task;
	struct fd_state *st;
	struct pt_regs *regs;
	struct call *c;
	__u64 id, buf = 0;
	__u32 len = 0, n, pid;
	__u16 family;
	long nr;
	int fd;

	if (ret < 0 || !sk || (op == HTTP_OP_READ && (flags & MSG_PEEK)))
		return 0;
	/* Most socket calls on a host are not on TCP (UNIX, netlink, UDP): the
	 * family alone sends those back before any map lookup. */
	family = BPF_CORE_READ((struct sock *)sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return 0;
	id = bpf_get_current_pid_tgid();
	pid = id >> 32;
	if (pid == self_tgid)
		return 0;
	st = bpf_map_lookup_elem(&http_conns, &sk);
	if (!st && (BPF_CORE_READ((struct sock *)sk, sk_type) != SOCK_STREAM ||
		    BPF_CORE_READ((struct sock *)sk, sk_protocol) != IPPROTO_TCP))
		return 0;
	if (!st || (st->flags & FD_TLS)) {
		c = bpf_map_lookup_elem(&ssl_calls, &id);
		if (c && c->op) {	/* underneath SSL_read/SSL_write: ciphertext */
			c->sk = sk;
			if (!st)
				conn_get(sk, FD_TLS);
			return 0;
		}
		if (st)
			return 0;
	}
	/* The syscall's own arguments: only a read/write-family call on this
	 * very socket is ours to read from (io_uring, recvmmsg and the kernel's
	 * own senders inside some other syscall are counted and skipped). */
	/* Direct loads through the task's BTF pointer and its saved registers
	 * instead of a probe-read helper call each: 1.5 us less BPF time per
	 * keep-alive request (bench/http_load.py, socket tracepoints alone). */
	task = bpf_get_current_task_btf();
	if (task->flags & PF_KTHREAD)
		goto untracked;
	if (task->thread_info.status & TS_COMPAT)
		return 0;
	regs = (void *)bpf_task_pt_regs(task);
	nr = regs->orig_ax;
	fd = regs->di;		/* x86-64 syscall arguments: di, si, dx, r10, ... */
	switch (nr) {
	case NR_read: case NR_write: case NR_sendto: case NR_recvfrom:
		buf = regs->si;
		len = regs->dx;
		break;
	case NR_readv: case NR_writev:
		first_iov((void *)regs->si, &buf, &len);
		break;
	case NR_recvmsg: case NR_sendmsg:
		first_msg_iov((void *)regs->si, &buf, &len);
		break;
	case NR_splice:
		fd = regs->dx;
		/* fallthrough */
	case NR_sendfile:	/* body bytes sent from a file or pipe: no head */
		if (op != HTTP_OP_WRITE)
			goto untracked;
		op = HTTP_OP_SENDFILE;
		break;
	default:
		goto untracked;
	}
	n = ret > 0x7fffffff ? 0x7fffffff : ret;
	if (!st) {
		if (op == HTTP_OP_SENDFILE || !http_start((void *)buf, n < len ? n : len))
			return 0;
		if (tcp_sock_of(fd) != sk)
			goto untracked;
		st = conn_get(sk, FD_HTTP);
		if (!st)
			return 0;
		st->flags |= FD_HTTP;
		st->pid = pid;
		st->fd = fd;
	} else if (st->pid != pid || st->fd != fd) {
		/* another process or fd on a known connection: check it is this socket */
		if (tcp_sock_of(fd) != sk)
			goto untracked;
		st->pid = pid;
		st->fd = fd;
	}
	st->tid = (__u32)id;
	if (n == 0) {
		if (op == HTTP_OP_READ)
			emit(HTTP_OP_EOF, 0, id, fd, st, bpf_ktime_get_ns(), 0, NULL, 0);
		return 0;
	}
	emit(op, 0, id, fd, st, bpf_ktime_get_ns(), n, op == HTTP_OP_SENDFILE ? NULL : (void *)buf,
	     len);
	return 0;
untracked:
	if (st)
		stat_inc(HTTP_STAT_CALLS_UNTRACKED);
	return 0;
}

SEC("raw_tracepoint/sock_send_length")
int http_sock_send(struct bpf_raw_tracepoint_args *ctx)
{
	return sock_call(ctx->args[0], (int)ctx->args[1], (int)ctx->args[2], HTTP_OP_WRITE);
}

SEC("raw_tracepoint/sock_recv_length")
int http_sock_recv(struct bpf_raw_tracepoint_args *ctx)
{
	return sock_call(ctx->args[0], (int)ctx->args[1], (int)ctx->args[2], HTTP_OP_READ);
}

/* A connection that reaches TCP_CLOSE is done: user space ends what is
 * pending on it, and the entry goes before the sock's address can be reused.
 * Often runs in softirq: the record names the last process that used it. */
SEC("raw_tracepoint/inet_sock_set_state")
int http_sock_state(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 sk = ctx->args[0];
	struct fd_state *st;

	if ((int)ctx->args[2] != TCP_CLOSE)
		return 0;
	st = bpf_map_lookup_elem(&http_conns, &sk);
	if (!st)
		return 0;
	if ((st->flags & FD_HTTP) && st->pid)
		emit(HTTP_OP_CLOSE, !!(st->flags & FD_TLS), ((__u64)st->pid << 32) | st->tid, st->fd,
		     st, bpf_ktime_get_ns(), 0, NULL, 0);
	bpf_map_delete_elem(&http_conns, &sk);
	return 0;
}

/* --- TLS library (uprobes) ------------------------------------------------- */

/* Each thread keeps its ssl_calls entry between calls (op 0 when idle) and
 * writes it in place: an insert and a delete per SSL call cost more than
 * the rest of the probe (bench/http_load.py, SSL uprobes alone). */
static __always_inline int ssl_enter(void *ssl, const void *buf, __u64 outlen, __u8 op)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct call *c, init = {};

	if ((id >> 32) == self_tgid)
		return 0;
	c = bpf_map_lookup_elem(&ssl_calls, &id);
	if (!c) {
		bpf_map_update_elem(&ssl_calls, &id, &init, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&ssl_calls, &id);
		if (!c) {
			stat_inc(HTTP_STAT_SSL_UNTRACKED);
			return 0;
		}
	}
	c->ssl = (__u64)ssl;
	c->buf = (__u64)buf;
	c->outlen = outlen;
	c->sk = 0;
	c->fd = -1;
	c->start_ns = bpf_ktime_get_ns();
	c->op = op;
	return 0;
}

static __always_inline int ssl_exit(long ret, bool ex)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct call *c = bpf_map_lookup_elem(&ssl_calls, &id);
	struct ssl_key k = {};
	struct fd_state *st;
	__u64 n = 0, sk, *known;

	if (!c || !c->op)
		return 0;
	k.ssl = c->ssl;
	k.pid = id >> 32;
	sk = c->sk;
	if (sk) {
		known = bpf_map_lookup_elem(&ssl_fds, &k);
		if (!known)
			bpf_map_update_elem(&ssl_fds, &k, &sk, BPF_ANY);
		else if (*known != sk)
			*known = sk;
	} else {
		known = bpf_map_lookup_elem(&ssl_fds, &k);
		if (known)
			sk = *known;
	}
	/* ex: SSL_*_ex's return, or (bytes seen in signals/http/placement.py) the
	 * internal function both SSL_x and SSL_x_ex wrap: > 0 means done, count at outlen. */
	if (ex) {
		if (ret > 0 && c->outlen)
			bpf_probe_read_user(&n, sizeof(n), (void *)c->outlen);
	} else if (ret > 0) {
		n = ret;
	}
	if (n == 0)
		goto out;
	if (n > 0x7fffffff)
		n = 0x7fffffff;
	if (!sk) {
		stat_inc(HTTP_STAT_SSL_NO_FD);
		goto out;
	}
	st = conn_get(sk, FD_TLS);
	if (!st)
		goto out;
	if (!(st->flags & FD_HTTP)) {
		if (!http_start((void *)c->buf, n))
			goto out;
		st->flags |= FD_HTTP;
	}
	st->pid = k.pid;
	st->tid = (__u32)id;
	emit(c->op, 1, id, c->fd, st, c->start_ns, n, (void *)c->buf, n);
out:
	c->op = 0;
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(ssl_write_enter, void *ssl, const void *buf, int num)
{
	return ssl_enter(ssl, buf, 0, HTTP_OP_WRITE);
}

SEC("uprobe")
int BPF_KPROBE(ssl_read_enter, void *ssl, void *buf, int num)
{
	return ssl_enter(ssl, buf, 0, HTTP_OP_READ);
}

SEC("uprobe")
int BPF_KPROBE(ssl_write_ex_enter, void *ssl, const void *buf, __u64 num, __u64 *written)
{
	return ssl_enter(ssl, buf, (__u64)written, HTTP_OP_WRITE);
}

SEC("uprobe")
int BPF_KPROBE(ssl_read_ex_enter, void *ssl, void *buf, __u64 num, __u64 *readbytes)
{
	return ssl_enter(ssl, buf, (__u64)readbytes, HTTP_OP_READ);
}

/* SSL_set_fd(ssl, fd): the socket an SSL* works on, from its first use. Without
 * it, a read OpenSSL serves from its own buffer (no syscall underneath) falls
 * back to the fd this SSL* address last used, and nginx and wrk reuse the
 * addresses of freed SSL objects for new connections (bench/http_load.py,
 * https close). Entry only. */
SEC("uprobe")
int BPF_KPROBE(ssl_set_fd, void *ssl, int fd)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct ssl_key k = { .ssl = (__u64)ssl, .pid = id >> 32 };
	__u64 sk;

	if (k.pid == self_tgid || fd < 0)
		return 0;
	sk = tcp_sock_of(fd);
	if (sk)
		bpf_map_update_elem(&ssl_fds, &k, &sk, BPF_ANY);
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(ssl_exit_int, int ret)
{
	return ssl_exit(ret, false);
}

SEC("uretprobe")
int BPF_KRETPROBE(ssl_exit_ex, int ret)
{
	return ssl_exit(ret, true);
}
