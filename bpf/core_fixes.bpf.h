/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Kernel differences between 5.8 and today, in one place.  Per change: the upstream commit,
 * a minimal flavor of the old or new type (`___pre_5_14`, `___new`: libbpf matches it by the
 * name before the triple underscore, and relocates only the fields named here), and one
 * accessor that asks CO-RE which layout the running kernel has.  The check is resolved to a
 * constant at load, so the verifier never walks the other layout's code.
 */
#ifndef __KPOD_CORE_FIXES_BPF_H
#define __KPOD_CORE_FIXES_BPF_H

#include <vmlinux.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>

/* task_struct.state became __state in 5.14: 2f064a59a11f ("sched: Change task_struct::state"). */
struct task_struct___pre_5_14 {
	long state;
} __attribute__((preserve_access_index));

static __always_inline long kpod_task_state(struct task_struct *task)
{
	if (bpf_core_field_exists(task->__state))
		return BPF_CORE_READ(task, __state);
	return BPF_CORE_READ((struct task_struct___pre_5_14 *)task, state);
}

/* The same for a typed (tp_btf) task pointer: direct loads, no helper call. */
static __always_inline long kpod_btf_task_state(struct task_struct *task)
{
	if (bpf_core_field_exists(task->__state))
		return task->__state;
	return ((struct task_struct___pre_5_14 *)task)->state;
}

/*
 * The cgroup2 id of the cgroup a socket was created in (inherited by accepted sockets).
 *
 * 5.15+ (and 5.10.226+, where it was backported): sk->sk_cgrp_data.cgroup is a plain pointer,
 * 8520e224f547 ("bpf, cgroups: Fix cgroup v2 fallback on v1/v2 mixed mode").
 * Before: struct sock_cgroup_data is a union, and its u64 `val` holds the cgroup pointer only
 * while its two low bits are clear (is_data, no_refcnt).  Once a cgroup v1 net_cls or net_prio
 * hierarchy tags sockets (is_data = 1), `val` carries prioidx/classid instead, and the
 * kernel's own sock_cgroup_ptr() answers the root cgroup; so do we (id 1: no pod).
 *
 * The old route reads the union's first 8 bytes through the offset of sk_cgrp_data, with no
 * field of the old union named: on a new kernel those bytes are the `cgroup` pointer, so the
 * same code runs there (kpod.bpf.force_routes: sock_cgroup_val) and can be tested against
 * ground truth on any kernel we have.  `force_val` is the object's read-only flag.
 */
struct sock_cgroup_data___new {
	struct cgroup *cgroup;
} __attribute__((preserve_access_index));

#define KPOD_SOCK_CGROUP_TAG_BITS 3ULL
#define KPOD_ROOT_CGROUP_ID 1

static __always_inline __u64 kpod_sk_cgroup_id(const struct sock *sk, bool force_val)
{
	struct cgroup *cgrp;
	__u64 val = 0;

	if (!force_val && bpf_core_field_exists(((struct sock_cgroup_data___new *)0)->cgroup))
		return sk->sk_cgrp_data.cgroup->kn->id;  /* typed pointers: direct, fault-safe loads */
	bpf_probe_read_kernel(&val, sizeof(val), (const void *)&sk->sk_cgrp_data);
	if (val & KPOD_SOCK_CGROUP_TAG_BITS)
		return KPOD_ROOT_CGROUP_ID;  /* v1 net_cls/net_prio data, not a pointer */
	cgrp = (struct cgroup *)(unsigned long)val;
	if (!cgrp)
		return KPOD_ROOT_CGROUP_ID;  /* sock_cgroup_ptr()'s fallback too */
	return BPF_CORE_READ(cgrp, kn, id);
}

/* The same for an untyped socket pointer (a kprobe's argument kept in a map): probe reads. */
static __always_inline __u64 kpod_sk_cgroup_id_read(const struct sock *sk, bool force_val)
{
	struct cgroup *cgrp;
	__u64 val = 0;

	if (!force_val && bpf_core_field_exists(((struct sock_cgroup_data___new *)0)->cgroup))
		return BPF_CORE_READ(sk, sk_cgrp_data.cgroup, kn, id);
	bpf_probe_read_kernel(&val, sizeof(val), (const void *)&sk->sk_cgrp_data);
	if (val & KPOD_SOCK_CGROUP_TAG_BITS)
		return KPOD_ROOT_CGROUP_ID;
	cgrp = (struct cgroup *)(unsigned long)val;
	if (!cgrp)
		return KPOD_ROOT_CGROUP_ID;
	return BPF_CORE_READ(cgrp, kn, id);
}

#endif /* __KPOD_CORE_FIXES_BPF_H */
