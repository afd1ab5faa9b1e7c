// SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause
/* DNS capture: TC ingress and egress programs that copy the head of every
 * DNS message (UDP, or TCP segments starting a message) on the configured
 * ports into a ring buffer. Pairing queries with answers and parsing names
 * is user space's job; here we only find the payload and copy a bounded
 * head. The programs never change a packet's fate: they always return
 * TC_ACT_UNSPEC, so the next filter (flows, or anyone else's) still runs. */
#include "common.bpf.h"
#include "pkt.bpf.h"
#include "dns.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define TC_ACT_UNSPEC (-1)
#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF
#define NEXTHDR_HOP 0
#define NEXTHDR_TCP 6
#define NEXTHDR_UDP 17
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_DEST 60
#define DNS_FIXED_BYTES __builtin_offsetof(struct dns_event, head)

/* Ports (host order) that mark DNS; the first n_dns_ports are used. */
const volatile __u16 dns_ports[DNS_MAX_PORTS] = { 53 };
const volatile __u32 n_dns_ports = 1;
/* Bytes of each message copied into the record (1..DNS_HEAD_MAX); also
 * sizes the records. */
const volatile __u32 head_bytes = 256;

DEFINE_RINGBUF(dns_events, 4 << 20);

/* Keeps struct dns_event in the object's BTF (a test checks the Python layout
 * against it); locals alone do not survive into BTF. */
struct dns_event *unused_dns_event __attribute__((unused));

static __always_inline bool is_dns_port(__u16 port)
{
#pragma unroll
	for (int i = 0; i < DNS_MAX_PORTS; i++) {
		if (i >= n_dns_ports)
			break;
		if (dns_ports[i] == port)
			return true;
	}
	return false;
}

struct l4 {
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 off;		/* offset of the L4 header */
	__u8 family;
	__u8 proto;
};

/* IPv4: fills addresses, returns false for non-first fragments (no L4). */
static __always_inline bool parse_ipv4(struct __sk_buff *skb, __u32 off, struct l4 *l)
{
	struct iphdr ip;
	__u8 ihl;

	if (load(skb, false, off, &ip, sizeof(ip)))
		return false;
	ihl = ((__u8 *)&ip)[0] & 0x0f;
	if (ihl < 5 || (bpf_ntohs(ip.frag_off) & IP_OFFSET))
		return false;
	__builtin_memcpy(l->saddr, &ip.saddr, 4);
	__builtin_memcpy(l->daddr, &ip.daddr, 4);
	l->off = off + ihl * 4;
	l->family = 4;
	l->proto = ip.protocol;
	return true;
}

/* IPv6: skips up to four extension headers (hop-by-hop, routing,
 * destination options, the first fragment's header). */
static __always_inline bool parse_ipv6(struct __sk_buff *skb, __u32 off, struct l4 *l)
{
	struct ipv6hdr ip;
	__u8 nh;

	if (load(skb, false, off, &ip, sizeof(ip)))
		return false;
	__builtin_memcpy(l->saddr, &ip.saddr, 16);
	__builtin_memcpy(l->daddr, &ip.daddr, 16);
	nh = ip.nexthdr;
	off += sizeof(ip);
#pragma unroll
	for (int i = 0; i < 4; i++) {
		__u8 ext[2];

		if (nh != NEXTHDR_HOP && nh != NEXTHDR_ROUTING && nh != NEXTHDR_DEST &&
		    nh != NEXTHDR_FRAGMENT)
			break;
		if (load(skb, false, off, ext, sizeof(ext)))
			return false;
		if (nh == NEXTHDR_FRAGMENT) {
			__be16 frag;

			if (load(skb, false, off + 2, &frag, sizeof(frag)))
				return false;
			if (bpf_ntohs(frag) & 0xFFF8)	/* not the first fragment */
				return false;
			off += 8;
		} else {
			off += (ext[1] + 1) * 8;
		}
		nh = ext[0];
	}
	l->off = off;
	l->family = 6;
	l->proto = nh;
	return true;
}

/* `l3`: the device has no link-layer header (tun, WireGuard, IP-in-IP):
 * the packet starts with IP and skb->protocol says which. */
static __always_inline int handle(struct __sk_buff *skb, __u8 direction, bool l3)
{
	struct l4 l = {};
	__u32 off = 0, payload, avail, copy, msg_len;
	__u16 sport, dport;
	__be16 proto;
	struct dns_event *e;

	if (l3) {
		proto = skb->protocol;
	} else {
		if (load(skb, false, 12, &proto, sizeof(proto)))
			return TC_ACT_UNSPEC;
		off = 14;
		/* Tags still in the frame (not offloaded to skb->vlan_tci): up to two. */
#pragma unroll
		for (int i = 0; i < 2; i++) {
			if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
				break;
			if (load(skb, false, off + 2, &proto, sizeof(proto)))
				return TC_ACT_UNSPEC;
			off += 4;
		}
	}
	if (proto == bpf_htons(ETH_P_IP)) {
		if (!parse_ipv4(skb, off, &l))
			return TC_ACT_UNSPEC;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		if (!parse_ipv6(skb, off, &l))
			return TC_ACT_UNSPEC;
	} else {
		return TC_ACT_UNSPEC;
	}

	if (l.proto == NEXTHDR_UDP) {
		struct udphdr udp;

		if (load(skb, false, l.off, &udp, sizeof(udp)))
			return TC_ACT_UNSPEC;
		sport = bpf_ntohs(udp.source);
		dport = bpf_ntohs(udp.dest);
		if (!is_dns_port(sport) && !is_dns_port(dport))
			return TC_ACT_UNSPEC;
		payload = l.off + sizeof(udp);
		msg_len = bpf_ntohs(udp.len);
		msg_len = msg_len >= sizeof(udp) ? msg_len - sizeof(udp) : 0;
	} else if (l.proto == NEXTHDR_TCP) {
		struct tcphdr tcp;
		__be16 prefix;

		if (load(skb, false, l.off, &tcp, sizeof(tcp)))
			return TC_ACT_UNSPEC;
		sport = bpf_ntohs(tcp.source);
		dport = bpf_ntohs(tcp.dest);
		if (!is_dns_port(sport) && !is_dns_port(dport))
			return TC_ACT_UNSPEC;
		payload = l.off + ((((__u8 *)&tcp)[12] >> 4) * 4);
		/* Segments without data (handshake, ACKs, FIN) carry no message;
		 * we only read segments that start one (length prefix first). */
		if (payload + sizeof(prefix) >= skb->len)
			return TC_ACT_UNSPEC;
		if (load(skb, false, payload, &prefix, sizeof(prefix)))
			return TC_ACT_UNSPEC;
		msg_len = bpf_ntohs(prefix);
		payload += sizeof(prefix);
	} else {
		return TC_ACT_UNSPEC;
	}

	avail = skb->len > payload ? skb->len - payload : 0;
	copy = avail < msg_len ? avail : msg_len;
	if (copy > head_bytes)
		copy = head_bytes;

	/* Records are the fixed part plus head_bytes (rounded up to 8), not
	 * DNS_HEAD_MAX: with the default 256 that nearly halves the ring space
	 * per message. head_bytes is frozen rodata, so the verifier sees a
	 * constant size. */
	e = RINGBUF_RESERVE(dns_events, DNS_FIXED_BYTES + ((head_bytes + 7) & ~7U));
	if (!e)
		return TC_ACT_UNSPEC;
	e->ts_ns = bpf_ktime_get_ns();
	__builtin_memcpy(e->saddr, l.saddr, 16);
	__builtin_memcpy(e->daddr, l.daddr, 16);
	e->ifindex = skb->ifindex;
	e->sport = sport;
	e->dport = dport;
	e->msg_len = msg_len;
	e->seg_len = avail > 0xffff ? 0xffff : avail;
	e->family = l.family;
	e->proto = l.proto;
	e->direction = direction;
	__builtin_memset(e->pad, 0, sizeof(e->pad));
	/* The verifier needs the length proved within [1, head_bytes]. Older
	 * verifiers (6.1) do not narrow a register after `n == 0`, so test
	 * `n < 1`, and keep clang from rewriting that test back into `n == 0`. */
	{
		__s64 n = copy & 0x3ff;

		asm volatile("" : "+r"(n));
		if (n > head_bytes)
			n = head_bytes;
		if (n < 1 || bpf_skb_load_bytes(skb, payload, e->head, n))
			n = 0;
		e->head_len = n;
	}
	RINGBUF_SUBMIT(dns_events, e);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int dns_ingress(struct __sk_buff *skb)
{
	return handle(skb, DNS_DIR_INGRESS, false);
}

SEC("tc")
int dns_egress(struct __sk_buff *skb)
{
	return handle(skb, DNS_DIR_EGRESS, false);
}

/* The same for devices without a link-layer header; user space picks the
 * pair by the device's type (/sys/class/net/<if>/type). */
SEC("tc")
int dns_ingress_l3(struct __sk_buff *skb)
{
	return handle(skb, DNS_DIR_INGRESS, true);
}

SEC("tc")
int dns_egress_l3(struct __sk_buff *skb)
{
	return handle(skb, DNS_DIR_EGRESS, true);
}

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

struct gai_event *unused_gai_event __attribute__((unused));

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
