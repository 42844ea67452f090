// SPDX-License-Identifier: Apache-2.0
/*
 * TCP per cgroup: bytes sent / received, retransmits, connections, smoothed RTT.
 *
 * Every event is charged to the SOCKET's cgroup, sk->sk_cgrp_data.cgroup->kn->id (the cgroup2
 * id): retransmits, state changes and RTT samples mostly fire in softirq, where `current` is
 * whatever task the CPU happened to interrupt.  The socket's cgroup is set when the socket is
 * created (socket(2)), and an accepted socket inherits its listener's (sk_clone_lock copies
 * sk_cgrp_data), so it is the cgroup of the process that owns the socket.
 *
 * Bytes are what send/recv RETURNED (real bytes moved), not the lengths asked for:
 *  - 6.x: tp_btf/sock_send_length and tp_btf/sock_recv_length, which fire in
 *    sock_{send,recv}msg_nosec with the return value; only ret > 0 on TCP stream sockets, and
 *    MSG_PEEK reads are skipped (peeked bytes stay queued and are counted when consumed).
 *  - kernels without those tracepoints (6.1): fexit/tcp_sendmsg and fexit/tcp_recvmsg
 *    (return value, same socket cgroup), else a kprobe at entry (the socket, MSG_PEEK) paired
 *    with a kretprobe at return (below).
 *  Userspace picks one route per direction at load time (bpf_program__set_autoload).
 *  Before 6.5, sendfile/splice bytes are seen at tcp_sendpage in addition (below).
 *
 * Not seen by any route: splice(2) from a TCP socket (tcp_splice_read) and
 * TCP_ZEROCOPY_RECEIVE, which bypass recvmsg.
 */
#include "kpod.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define KPOD_MSG_PEEK 2

/* One entry per cgroup for all TCP counters: one lookup per event, one entry per pod. */
struct net_tcp_value {
	__u64 bytes_sent;
	__u64 bytes_received;
	__u64 retransmits;     /* retransmitted segments: tcp_skb_pcount() of each skb that
				* tcp:tcp_retransmit_skb reports without error, and one per
				* SYN-ACK a listener retransmits (tcp:tcp_retransmit_synack) */
	__u64 bytes_retransmitted;  /* the payload of those skbs (skb->len), as tcpi_bytes_retrans;
				     * a SYN-ACK has none */
	__u64 conn_active;     /* SYN_SENT -> ESTABLISHED (connect) */
	__u64 conn_passive;    /* SYN_RECV -> ESTABLISHED (accept side) */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KPOD_MAX_ENTRIES);
	__type(key, struct kpod_cgroup_key);
	__type(value, struct net_tcp_value);
} net_tcp SEC(".maps");

/* Smoothed RTT samples (nanoseconds) per cgroup; separate map: only pods with TCP traffic. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KPOD_MAX_ENTRIES);
	__type(key, struct kpod_cgroup_key);
	__type(value, struct kpod_hist);
} net_rtt SEC(".maps");

struct net_errors_value {
	__u64 net_tcp;
	__u64 net_rtt;
	__u64 tcp_calls;
};
KPOD_ERRORS_MAP(net_errors, struct net_errors_value);

#define ERR_OFF(map) offsetof(struct net_errors_value, map)

/* Set by userspace before load: kpod.bpf.force_routes: sock_cgroup_val (core_fixes.bpf.h). */
const volatile bool kpod_force_sock_cgroup_val = false;

/*
 * The cgroup2 id of the socket's owner, new or pre-5.15 layout (core_fixes.bpf.h).  tp_btf and
 * fexit hand us typed (BTF) pointers: on the new layout plain dereferences compile to direct,
 * fault-safe loads (a NULL anywhere reads as 0), cheaper than bpf_probe_read_kernel calls.
 */
static __always_inline __u64 sk_charge(const struct sock *sk, __u64 sk_cgroup)
{
	struct kpod_watch_cfg *cfg = NULL;
	__u64 charge, val = 0;

	/* The socket owner's cgroup as kpod_charge_quick() maps it: 0 for sockets of no pod. */
	if (kpod_charge_quick(sk_cgroup, &charge, &cfg) || !cfg)
		return charge;
	/*
	 * Possibly nested in a container: its cgroup pointer, untyped, from the first 8 bytes of
	 * sk_cgrp_data, which are the pointer on every kernel while the two tag bits are clear
	 * (bpf/core_fixes.bpf.h, kpod_sk_cgroup_id()).
	 */
	bpf_probe_read_kernel(&val, sizeof(val), (const void *)&sk->sk_cgrp_data);
	if (val & KPOD_SOCK_CGROUP_TAG_BITS)
		return 0;
	return kpod_charge_nested_read(cfg, (const struct cgroup *)(unsigned long)val);
}

static __always_inline __u64 sk_cgroup_id(const struct sock *sk)
{
	return sk_charge(sk, kpod_sk_cgroup_id(sk, kpod_force_sock_cgroup_val));
}

/* The same for an untyped socket pointer (a kprobe's argument, kept in a map): probe reads. */
static __always_inline __u64 sk_cgroup_id_read(const struct sock *sk)
{
	return sk_charge(sk, kpod_sk_cgroup_id_read(sk, kpod_force_sock_cgroup_val));
}

static __always_inline bool is_tcp_stream(const struct sock *sk)
{
	/* A SOCK_RAW socket can have protocol IPPROTO_TCP too: check the type as well. */
	return sk->sk_protocol == IPPROTO_TCP && sk->sk_type == SOCK_STREAM;
}

static __always_inline struct net_tcp_value *tcp_value(__u64 cgroup_id)
{
	struct kpod_cgroup_key key = { .cgroup_id = cgroup_id };
	struct net_tcp_value *v;

	if (!cgroup_id)
		return NULL;  /* a socket of no pod (Kubernetes modes) */
	v = bpf_map_lookup_elem(&net_tcp, &key);
	if (v)
		return v;
	{
		/* First event of this cgroup: the only path that builds a zeroed value. */
		struct net_tcp_value zero = {};

		return kpod_lookup_or_init(&net_tcp, &key, &zero, &net_errors, ERR_OFF(net_tcp));
	}
}

static __always_inline void add_sent(__u64 cgroup_id, __s64 bytes)
{
	struct net_tcp_value *v;

	if (bytes <= 0)
		return;
	v = tcp_value(cgroup_id);
	if (v)
		__sync_fetch_and_add(&v->bytes_sent, bytes);
}

static __always_inline void add_received(__u64 cgroup_id, __s64 bytes)
{
	struct net_tcp_value *v;

	if (bytes <= 0)
		return;
	v = tcp_value(cgroup_id);
	if (v)
		__sync_fetch_and_add(&v->bytes_received, bytes);
}

/* --- bytes, 6.x route: the tracepoints carry the return value --------------------------- */

SEC("tp_btf/sock_send_length")
int BPF_PROG(tcp_send_length, struct sock *sk, int ret, int flags)
{
	if (ret <= 0 || !is_tcp_stream(sk))
		return 0;
	add_sent(sk_cgroup_id(sk), ret);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(tcp_recv_length, struct sock *sk, int ret, int flags)
{
	if (ret <= 0 || (flags & KPOD_MSG_PEEK) || !is_tcp_stream(sk))
		return 0;
	add_received(sk_cgroup_id(sk), ret);
	return 0;
}

/* --- bytes, fallback 1 (kernels without sock_*_length): fexit sees args and return ------ */

SEC("fexit/tcp_sendmsg")
int BPF_PROG(tcp_sendmsg_exit, struct sock *sk, struct msghdr *msg, size_t size, int ret)
{
	add_sent(sk_cgroup_id(sk), ret);
	return 0;
}

/* The 5.19+ signature (no `nonblock`); userspace only picks this route when the kernel's BTF
 * says tcp_recvmsg has these five parameters. */
SEC("fexit/tcp_recvmsg")
int BPF_PROG(tcp_recvmsg_exit, struct sock *sk, struct msghdr *msg, size_t len, int flags, int *addr_len,
	     int ret)
{
	if (flags & KPOD_MSG_PEEK)
		return 0;
	add_received(sk_cgroup_id(sk), ret);
	return 0;
}

/* --- bytes, fallback 2: kprobe at entry + kretprobe at return -------------------------- */

/*
 * A kretprobe sees only the return value.  The entry kprobe of the same function keeps the
 * call's socket, and whether it peeks, per thread (a thread is inside one TCP call at a time),
 * and the return charges the SOCKET's cgroup and skips peeks, as the other routes do.  Where
 * the entry was not kept (the map was full, or the entry program did not run because another
 * kprobe program was running on that CPU), the return falls back to the caller's cgroup:
 * the bytes are still counted, only their cgroup may differ (process context: the caller).
 *
 * What this route cannot see: a return the kernel does not hook.  A kretprobe holds one
 * instance per call in flight, at most `maxactive` (libbpf's perf-event kretprobes get the
 * kernel's default, max(10, 2 x possible CPUs) on preemptible kernels); a call entered while
 * all are taken (many threads blocked in recv) is not seen at return (docs/KERNELS.md).
 * LRU: an entry left by such a missed return is overwritten by the thread's next call, or
 * evicted.
 */
struct tcp_call {
	__u64 sk;
	__u32 peek;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);  /* threads inside a TCP call at once; 1 where no kprobe runs */
	__type(key, __u32);          /* thread id */
	__type(value, struct tcp_call);
} tcp_calls SEC(".maps");

/* Set by userspace: tcp_recvmsg's `flags` is its 4th parameter since 5.19, the 5th before
 * (a `nonblock` came first); the constant lets the verifier drop the other read. */
const volatile bool kpod_recvmsg_flags_5th = false;

static __always_inline void call_begins(const struct sock *sk, __u32 peek)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct tcp_call call = { .sk = (__u64)(unsigned long)sk, .peek = peek };

	if (bpf_map_update_elem(&tcp_calls, &tid, &call, BPF_ANY))
		kpod_count_error(&net_errors, ERR_OFF(tcp_calls));
}

/* The cgroup to charge at return, 0 for a peek (or no pod's); the thread's entry is consumed. */
static __always_inline __u64 call_ends(void)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct tcp_call *call = bpf_map_lookup_elem(&tcp_calls, &tid);
	const struct sock *sk;
	__u32 peek;

	if (!call)
		return kpod_charge_current_read();
	sk = (const struct sock *)(unsigned long)call->sk;
	peek = call->peek;
	bpf_map_delete_elem(&tcp_calls, &tid);
	if (peek)
		return 0;
	return sk_cgroup_id_read(sk);
}

SEC("kprobe/tcp_sendmsg")
int BPF_KPROBE(tcp_sendmsg_entry, struct sock *sk)
{
	call_begins(sk, 0);
	return 0;
}

SEC("kretprobe/tcp_sendmsg")
int BPF_KRETPROBE(tcp_sendmsg_ret, int ret)
{
	__u64 cgroup_id = call_ends();

	if (cgroup_id)
		add_sent(cgroup_id, ret);
	return 0;
}

SEC("kprobe/tcp_recvmsg")
int BPF_KPROBE(tcp_recvmsg_entry, struct sock *sk)
{
	long flags4 = (long)PT_REGS_PARM4(ctx), flags5 = (long)PT_REGS_PARM5(ctx);

	/* Both read at fixed offsets: the verifier refuses a ctx load at a computed one, which
	 * is what clang makes of choosing between the two loads. */
	barrier_var(flags4);
	barrier_var(flags5);
	call_begins(sk, ((kpod_recvmsg_flags_5th ? flags5 : flags4) & KPOD_MSG_PEEK) ? 1 : 0);
	return 0;
}

SEC("kretprobe/tcp_recvmsg")
int BPF_KRETPROBE(tcp_recvmsg_ret, int ret)
{
	__u64 cgroup_id = call_ends();

	if (cgroup_id)
		add_received(cgroup_id, ret);
	return 0;
}

/* --- bytes, sendpage (before 6.5): sendfile(2), splice(2) to a socket -------------------- */

/*
 * Before 6.5 ("sock: Remove ->sendpage*() in favour of sendmsg(MSG_SPLICE_PAGES)"), sendfile
 * and splice to a TCP socket go inet_sendpage -> tcp_sendpage, past tcp_sendmsg and
 * sock_sendmsg: none of the routes above sees those bytes (on 6.3/6.4 not even the
 * tracepoint).  Wherever tcp_sendpage exists, one of these runs beside the sendmsg route;
 * without a scatter-gather route tcp_sendpage falls back to tcp_sendmsg_locked, which no
 * route hooks, so nothing is counted twice.  kTLS is not seen before 6.5 either way: its
 * records go out through do_tcp_sendpages, and its sendmsg is tls_sw_sendmsg.
 */
SEC("fexit/tcp_sendpage")
int BPF_PROG(tcp_sendpage_exit, struct sock *sk, struct page *page, int offset, size_t size, int flags, int ret)
{
	add_sent(sk_cgroup_id(sk), ret);
	return 0;
}

SEC("kprobe/tcp_sendpage")
int BPF_KPROBE(tcp_sendpage_entry, struct sock *sk)
{
	call_begins(sk, 0);
	return 0;
}

SEC("kretprobe/tcp_sendpage")
int BPF_KRETPROBE(tcp_sendpage_ret, int ret)
{
	__u64 cgroup_id = call_ends();

	if (cgroup_id)
		add_sent(cgroup_id, ret);
	return 0;
}

/* --- retransmits ------------------------------------------------------------------------ */

/* 6.11+ passes the result of the retransmission (and fires on failures too). */
struct trace_event_raw_tcp_retransmit_skb___kpod {
	int err;
} __attribute__((preserve_access_index));

/*
 * The segments this retransmission adds to the kernel's own counters: __tcp_retransmit_skb adds
 * tcp_skb_pcount(skb) (TCP_SKB_CB(skb)->tcp_gso_segs, read after tcp_fragment cut the skb to
 * what goes out) to tcpi_total_retrans and to TcpRetransSegs, and one skb may carry many
 * segments (GSO/TSO).  The tracepoint fires later in the same call on the same skb, whose
 * control block the transmission does not change (it sends a clone or a copy).  The field has
 * been there since 3.18; the CO-RE check only keeps the program loadable on a kernel whose BTF
 * lacks the type, where each skb counts as one segment.
 */
static __always_inline __u64 retransmitted_segments(const struct sk_buff *skb)
{
	const struct tcp_skb_cb *cb = (const struct tcp_skb_cb *)&skb->cb[0];

	if (!bpf_core_field_exists(struct tcp_skb_cb, tcp_gso_segs))
		return 1;
	return BPF_CORE_READ(cb, tcp_gso_segs);
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(tcp_retransmit)
{
	const struct sock *sk = (const struct sock *)ctx[0];
	const struct sk_buff *skb = (const struct sk_buff *)ctx[1];
	struct net_tcp_value *v;

	/*
	 * CO-RE resolves the check to a constant at load, so on kernels whose tracepoint has two
	 * arguments the verifier never sees the ctx[2] access.  Before 6.11 the tracepoint fires
	 * only for a successful retransmission; from 6.11 on it fires for failures too, with err:
	 * both count only successes.  (The kernel also counts a transmission that failed after
	 * the segments were counted, which TcpExtTCPRetransFail counts as well: docs/TROUBLESHOOTING.md.)
	 * The kernel adds skb->len to tcpi_bytes_retrans at the same place: the payload, as the
	 * control block, is not changed by the transmission.
	 */
	if (bpf_core_field_exists(struct trace_event_raw_tcp_retransmit_skb___kpod, err)) {
		if ((int)ctx[2] != 0)
			return 0;  /* not retransmitted (e.g. -EBUSY: still queued in the host) */
	}
	v = tcp_value(sk_cgroup_id(sk));
	if (!v)
		return 0;
	__sync_fetch_and_add(&v->retransmits, retransmitted_segments(skb));
	__sync_fetch_and_add(&v->bytes_retransmitted, BPF_CORE_READ(skb, len));
	return 0;
}

/*
 * SYN-ACKs retransmitted by a listener, which tcp:tcp_retransmit_skb never sees: a request
 * (SYN_RECV) has no write queue.  tcp_rtx_synack (net/ipv4/tcp_output.c, the same in 5.8, 6.1
 * and 6.18) is called when the listener's request timer fires and when the client's SYN comes
 * again; when the SYN-ACK went out it adds one to TcpRetransSegs and TcpExtTCPSynRetrans and
 * fires this tracepoint.  `sk` is the listener (made by the pod's process; an accepted socket
 * later inherits its cgroup), or for a passive TCP Fast Open connection the child socket,
 * whose tcpi_total_retrans the kernel then counts it in.  One segment, no payload: the kernel
 * adds nothing to tcpi_bytes_retrans here (only __tcp_retransmit_skb does), nor do we.
 * Rare by nature (lost SYN-ACKs: a SYN flood, a lossy path to clients): no per-packet cost.
 */
SEC("tp_btf/tcp_retransmit_synack")
int BPF_PROG(tcp_retransmit_synack)
{
	const struct sock *sk = (const struct sock *)ctx[0];
	struct net_tcp_value *v = tcp_value(sk_cgroup_id(sk));

	if (v)
		__sync_fetch_and_add(&v->retransmits, 1);
	return 0;
}

/* --- connections -------------------------------------------------------------------------- */

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(tcp_set_state, const struct sock *sk, const int oldstate, const int newstate)
{
	struct net_tcp_value *v;

	if (newstate != TCP_ESTABLISHED || (oldstate != TCP_SYN_SENT && oldstate != TCP_SYN_RECV))
		return 0;
	if (sk->sk_protocol != IPPROTO_TCP)
		return 0;  /* the tracepoint fires for SCTP and DCCP sockets too */
	v = tcp_value(sk_cgroup_id(sk));
	if (!v)
		return 0;
	if (oldstate == TCP_SYN_SENT)
		__sync_fetch_and_add(&v->conn_active, 1);
	else
		__sync_fetch_and_add(&v->conn_passive, 1);
	return 0;
}

/* --- smoothed RTT --------------------------------------------------------------------------- */

/*
 * tcp_probe fires for each incoming segment on an established socket (tcp_rcv_established).
 * The kernel keeps srtt_us scaled by 8 (tcp_rtt_estimator); the tracepoint's own `srtt` field
 * is srtt_us >> 3, i.e. microseconds.  We read the socket, so we shift exactly once to get that
 * same value, then make nanoseconds for the shared histogram.
 */
static __always_inline void rtt_sample(const struct sock *sk, __u32 srtt_us_x8)
{
	struct kpod_cgroup_key key;
	struct kpod_hist *hist;
	__u32 srtt_us = srtt_us_x8 >> 3;

	if (!srtt_us)
		return;  /* no RTT sample yet */
	key.cgroup_id = sk_cgroup_id(sk);
	if (!key.cgroup_id)
		return;
	hist = bpf_map_lookup_elem(&net_rtt, &key);
	if (!hist) {
		struct kpod_hist zero = {};

		hist = kpod_lookup_or_init(&net_rtt, &key, &zero, &net_errors, ERR_OFF(net_rtt));
		if (!hist)
			return;
	}
	kpod_hist_add(hist, (__u64)srtt_us * 1000);
}

/*
 * The argument is typed struct sock, and the verifier refuses direct loads past it.  6.2+ has
 * the bpf_rdonly_cast kfunc, which the verifier turns into nothing: the tcp_sock field is then
 * a plain load.  Where it is missing this program fails to load and the next one (one probe
 * read) is used instead.
 */
/* __weak: where the kernel lacks it the object still loads; only this program fails (the
 * call is left unresolved) and is dropped for the next alternative. */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym __weak;

SEC("tp_btf/tcp_probe")
int BPF_PROG(tcp_probe, struct sock *sk, const struct sk_buff *skb)
{
	struct tcp_sock *tp = bpf_rdonly_cast(sk, bpf_core_type_id_kernel(struct tcp_sock));

	rtt_sample(sk, tp->srtt_us);
	return 0;
}

SEC("tp_btf/tcp_probe")
int BPF_PROG(tcp_probe_read, struct sock *sk, const struct sk_buff *skb)
{
	rtt_sample(sk, BPF_CORE_READ((struct tcp_sock *)sk, srtt_us));
	return 0;
}
