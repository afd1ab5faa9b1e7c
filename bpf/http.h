/* SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause */
/* Records of the HTTP object, read by clang and by cffi (ebpf_otlp.layout):
 * fixed-width types, explicit padding, no bitfields, no includes. */
#ifndef EBPF_OTLP_HTTP_H
#define EBPF_OTLP_HTTP_H

/* Upper bound of the bytes copied per call. A record is the fields before
 * head[] plus the rodata `head_bytes` (<= this) rounded up to 8, so every
 * record of one loaded object has the same size and a batch decodes as one
 * numpy array. */
#define HTTP_HEAD_MAX 1024

/* What a record says happened on the connection. */
#define HTTP_OP_READ 1		/* bytes received (read, readv, recvfrom, recvmsg, SSL_read*) */
#define HTTP_OP_WRITE 2		/* bytes sent (write, writev, sendto, sendmsg, SSL_write*) */
#define HTTP_OP_SENDFILE 3	/* body bytes sent by sendfile: len only, no head */
#define HTTP_OP_EOF 4		/* a read returned 0: the peer closed its side */
#define HTTP_OP_CLOSE 5		/* the process closed the fd */

/* One read or write on a TCP connection that carries HTTP (or starts to). */
struct http_event {
	__u64 start_ns;		/* SSL calls: entry; syscalls: their return (= end_ns); CLOCK_MONOTONIC */
	__u64 end_ns;		/* call return */
	__u64 conn;		/* the struct sock's address: the connection while it is open */
	__u32 pid;
	__u32 tid;
	__s32 fd;
	__u32 len;		/* bytes the call moved */
	__u8 laddr[16];		/* local address; IPv4-mapped for IPv4 (::ffff:a.b.c.d) */
	__u8 raddr[16];		/* remote address */
	__u16 lport;		/* host byte order */
	__u16 rport;
	__u16 head_len;		/* valid bytes in head[] */
	__u8 op;		/* HTTP_OP_* */
	__u8 tls;		/* 1: plaintext seen through the TLS library's uprobes */
	__u8 family;		/* 4 or 6 (0: socket not known) */
	__u8 ids;		/* 1: comm and cgroup_id are set (a process's first record on */
	__u8 pad[6];		/* the connection; user space keeps them per process) */
	__u8 comm[16];
	__u64 cgroup_id;	/* the calling process's cgroup v2 id; 0 when attribution is off */
	__u32 netns;		/* inode of the socket's network namespace; 0 unknown or off */
	__u32 pad2;
	__u8 head[HTTP_HEAD_MAX];
};

/* Per-CPU counters (array `http_stats`), exported as ebpf_otlp.http.kernel.*. */
/* socket mode: a call on an HTTP connection not made by a read/write-family
 * syscall on that socket (io_uring, recvmmsg, the kernel's own senders) */
#define HTTP_STAT_CALLS_UNTRACKED 0
#define HTTP_STAT_FD_UNTRACKED 1	/* fd cache or connection table insert failed */
#define HTTP_STAT_SSL_UNTRACKED 2	/* SSL call in flight table full */
#define HTTP_STAT_SSL_NO_FD 3		/* SSL call whose socket was never seen */
#define HTTP_STAT_READ_FAILED 4		/* user memory not readable */
#define HTTP_STAT_MAX 5

#endif
