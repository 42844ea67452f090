/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Shared helpers for kpod's BPF programs (CO-RE, compiled against vmlinux.h).
 *
 * Conventions that the Python side (kpod/kernel/ebpf.py) relies on, so keep them:
 *  - A per-cgroup map's key is a struct with a member named `cgroup_id` (the cgroup2 id, i.e.
 *    the cgroup directory's inode).  Userspace finds cgroup keys by that name to delete the
 *    entries of cgroups that are gone, and sets such maps' max_entries from the config.
 *  - Each object has one error map named `<prefix>_errors`: an ARRAY with one entry whose value
 *    is a struct of __u64 counters, one member per map, named exactly like the map.  Failed
 *    inserts are counted there, in the kernel (kpod.bpf.map.update.errors.total{map}).
 *  - Histograms are `struct kpod_hist` over nanoseconds, slots at powers of two seconds (see
 *    kpod_hist_slot).
 *  - Map names stay <= 15 characters: the kernel truncates longer ones, and bpftool then shows
 *    a different name than libbpf.
 *  - Every handler charges a cgroup through kpod_charge*(): the id to key its maps with, or 0
 *    to do nothing (Kubernetes modes: only pods and their containers count).  The maps behind
 *    it, kpod_watched and kpod_watch_cfg, belong to bpf/cgroups.bpf.c; userspace makes every
 *    object share that object's maps (bpf_map__reuse_fd) before loading it.
 */
#ifndef __KPOD_BPF_H
#define __KPOD_BPF_H

#include <vmlinux.h>  /* angle brackets: -I picks the target arch's (BPF_OUT), not bpf/'s */
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "core_fixes.bpf.h"  /* kernel differences: task state, socket cgroup */

/* Default size of per-cgroup maps; the agent overrides it before load (kpod.bpf.map_max_entries). */
#define KPOD_MAX_ENTRIES 10240

/* vmlinux.h has no errno values. */
#define KPOD_EEXIST 17

#define KPOD_TASK_RUNNING 0

struct kpod_cgroup_key {
	__u64 cgroup_id;
};

/*
 * Histogram over nanoseconds whose slot boundaries are powers of two SECONDS, so that every slot
 * is exactly one bucket of a Prometheus native histogram (schema 0) or an OpenTelemetry exponential
 * histogram (scale 0): bucket i holds (2^(i-1), 2^i] s.  A power of two of a second is not a power
 * of two of a nanosecond (1 s = 2^9 * 5^9 ns), so plain log2 slots over ns would straddle them.
 *
 *   slot 0              the zero bucket: [0, 2^-ZERO_SHIFT s] = [0, 953] ns
 *   slot k, 1..SLOTS-2  (2^(k-ZERO_SHIFT-1), 2^(k-ZERO_SHIFT)] s, i.e. native bucket k - ZERO_SHIFT
 *   slot SLOTS-1        everything above 2^(SLOTS-2-ZERO_SHIFT) s (the +Inf bucket)
 *
 * With 20 and 27: zero bucket up to 2^-20 s (953.67 ns), last finite bound 2^5 = 32 s.  Userspace
 * reads these two constants from the object's BTF to name the bounds.
 */
enum kpod_hist_layout {
	KPOD_HIST_ZERO_SHIFT = 20,
	KPOD_HIST_SLOTS = 27,
};

struct kpod_hist {
	__u64 slots[KPOD_HIST_SLOTS];
	__u64 sum;   /* nanoseconds */
	__u64 count;
	/*
	 * Zero bytes: only here so that the enum above (the slot mapping) is in the object's BTF,
	 * where userspace reads it to compute the bucket bounds.
	 */
	enum kpod_hist_layout layout[0];
};

/* floor(log2(v)) for v > 0, branch-free enough for the verifier (no loops). */
/* 64-bit arithmetic throughout: 32-bit values make clang insert zero-extension copies whose
 * bounds older verifiers (6.1) do not connect to the checks below. */
static __always_inline __u64 kpod_log2(__u64 v)
{
	__u64 r = 0, shift;

	shift = (v > 0xFFFFFFFFULL) << 5; v >>= shift; r |= shift;
	shift = (v > 0xFFFF) << 4; v >>= shift; r |= shift;
	shift = (v > 0xFF) << 3; v >>= shift; r |= shift;
	shift = (v > 0xF) << 2; v >>= shift; r |= shift;
	shift = (v > 0x3) << 1; v >>= shift; r |= shift;
	r |= (v >> 1);
	return r;
}

#define KPOD_NSEC_PER_SEC 1000000000ULL
#define KPOD_NSEC_PER_SEC_LOG2 29  /* 2^29 < 10^9 < 2^30 */

/*
 * The slot of v ns.  For L = floor(log2 v), v lies in [2^L, 2^(L+1)) ns, and exactly one native
 * boundary lies in that range: B = 2^(L-29) s = 10^9 << (L-29) ns, about 1.86 * 2^L.  So v is
 * in native bucket L-29 if v <= B, else L-28: one comparison, made exactly in integers by
 * shifting whichever side is smaller (no overflow: v << (29-L) < 2^30, 10^9 << 34 < 2^64).
 * bench/hist_slot.py measures what it costs over plain log2 slots.
 */
static __always_inline __u64 kpod_hist_slot(__u64 v)
{
	__u64 l, above, slot;

	if (!v)
		return 0;
	l = kpod_log2(v);
	if (l >= KPOD_NSEC_PER_SEC_LOG2)
		above = v > (KPOD_NSEC_PER_SEC << (l - KPOD_NSEC_PER_SEC_LOG2));
	else
		above = (v << (KPOD_NSEC_PER_SEC_LOG2 - l)) > KPOD_NSEC_PER_SEC;
	/* native index i = l - 29 + above; slot = i + ZERO_SHIFT, clamped to [0, SLOTS-1] */
	slot = l + above;
	if (slot <= KPOD_NSEC_PER_SEC_LOG2 - KPOD_HIST_ZERO_SHIFT)
		return 0;
	slot -= KPOD_NSEC_PER_SEC_LOG2 - KPOD_HIST_ZERO_SHIFT;
	return slot < KPOD_HIST_SLOTS ? slot : KPOD_HIST_SLOTS - 1;
}

static __always_inline void kpod_hist_add(struct kpod_hist *h, __u64 v)
{
	__u64 slot = kpod_hist_slot(v);

	/*
	 * Re-check the bound on the very register used as the index: barrier_var() stops clang
	 * from dropping the check as redundant or indexing with a copy made before it.
	 */
	barrier_var(slot);
	if (slot >= KPOD_HIST_SLOTS)
		return;
	__sync_fetch_and_add(&h->slots[slot], 1);
	__sync_fetch_and_add(&h->sum, v);
	__sync_fetch_and_add(&h->count, 1);
}

/* Defines the object's error map; `value_type` is a struct of one __u64 per map, named like the map. */
#define KPOD_ERRORS_MAP(name, value_type)		\
	struct {					\
		__uint(type, BPF_MAP_TYPE_ARRAY);	\
		__uint(max_entries, 1);			\
		__type(key, __u32);			\
		__type(value, value_type);		\
	} name SEC(".maps")

/* Count one failed update at byte offset `off` of the error map's value (offsetof(struct, map)). */
static __always_inline void kpod_count_error(void *errors, __u32 off)
{
	__u32 zero = 0;
	char *counters = bpf_map_lookup_elem(errors, &zero);

	if (counters)
		__sync_fetch_and_add((__u64 *)(counters + off), 1);
}

/*
 * Look `key` up, inserting `init` if it is absent.  A failed insert (map full, out of memory)
 * is counted in the error map and returns NULL.  -EEXIST means another CPU inserted the key
 * between our lookup and update, which is fine: look it up again.
 */
static __always_inline void *kpod_lookup_or_init(void *map, const void *key, const void *init,
						 void *errors, __u32 err_off)
{
	void *val = bpf_map_lookup_elem(map, key);
	long rc;

	if (val)
		return val;
	rc = bpf_map_update_elem(map, key, init, BPF_NOEXIST);
	if (rc && rc != -KPOD_EEXIST) {
		kpod_count_error(errors, err_off);
		return NULL;
	}
	return bpf_map_lookup_elem(map, key);
}

/* Add `delta` to a __u64 counter, inserting it on first use (failures counted as above). */
static __always_inline void kpod_counter_add(void *map, const void *key, __u64 delta,
					     void *errors, __u32 err_off)
{
	__u64 zero = 0, *val;

	val = kpod_lookup_or_init(map, key, &zero, errors, err_off);
	if (val)
		__sync_fetch_and_add(val, delta);
}

/*
 * The cgroup2 id of any task (not only current): task->cgroups->dfl_cgrp->kn->id, read with
 * CO-RE so field offsets are relocated to the running kernel.  Equals bpf_get_current_cgroup_id()
 * for current and the inode of the cgroup2 directory (stat -c %i).
 */
static __always_inline __u64 kpod_task_cgroup_id(struct task_struct *task)
{
	return BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
}

/*
 * Per-task timestamps (run-queue enqueue, syscall entry): task-local storage where tracing
 * programs may use it (5.13+), else a HASH keyed by thread id.  One map declaration serves
 * both: it is declared as TASK_STORAGE, and where userspace's probe (a tp_btf program calling
 * bpf_task_storage_get, kpod/kernel/probes.py) fails, or kpod.bpf.force_routes names tid_hash,
 * userspace clears kpod_task_storage and retypes the map (bpf_map__set_type) before load.
 * The flag is read-only data, so the verifier sees a constant and never walks the other
 * route: a kernel without task storage never meets its helpers.
 * The hash costs a hash lookup per access instead of a pointer chase, needs deleting (when
 * consumed, and at sched_process_exit), and can fill up (counted as a failed insert).
 */
#define KPOD_TASK_STORAGE_FLAG const volatile bool kpod_task_storage = true

/* `storage`: the object's kpod_task_storage (each object that keeps stamps declares it). */
static __always_inline __u64 *kpod_task_stamp(void *map, bool storage, struct task_struct *task, bool create)
{
	__u32 tid;
	__u64 *ts, zero = 0;
	long rc;

	if (storage)
		return bpf_task_storage_get(map, task, 0, create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
	tid = BPF_CORE_READ(task, pid);
	ts = bpf_map_lookup_elem(map, &tid);
	if (ts || !create)
		return ts;
	rc = bpf_map_update_elem(map, &tid, &zero, BPF_NOEXIST);
	if (rc && rc != -KPOD_EEXIST)
		return NULL;
	return bpf_map_lookup_elem(map, &tid);
}

/* The stamp was consumed: zeroed in task storage (the slot stays with the task), deleted
 * from the hash (which would otherwise fill with every task that ever waited). */
static __always_inline void kpod_task_stamp_done(void *map, bool storage, struct task_struct *task, __u64 *ts)
{
	__u32 tid;

	if (storage) {
		*ts = 0;
		return;
	}
	tid = BPF_CORE_READ(task, pid);
	bpf_map_delete_elem(map, &tid);
}

static __always_inline void kpod_task_stamp_forget(void *map, bool storage, struct task_struct *task)
{
	__u32 tid;

	if (storage)
		return;  /* the kernel frees task storage with the task */
	tid = BPF_CORE_READ(task, pid);
	bpf_map_delete_elem(map, &tid);
}

/*
 * Which cgroups count, and as whom.
 *
 * Local mode (no Kubernetes): every cgroup counts as itself, as the host shows it.
 *
 * Kubernetes modes: only pods and containers count.  kpod_watched maps the cgroup2 ids of the
 * kubepods root, its QoS cgroups, pods and containers to what they are and whom to charge:
 * userspace fills it from its walk of the tree, and bpf/cgroups.bpf.c keeps it current in the
 * kernel at every mkdir (a child of kubepods or of a QoS cgroup is a pod, a child of a pod is
 * a container), so a container that lives for a millisecond is charged to itself from its
 * first event.  A cgroup below a container (a runtime's or the workload's own sub-cgroups,
 * cgroup delegation) has no entry: it is charged to its container, found among its
 * ancestors.  So one container takes one entry in every per-cgroup map however many cgroups
 * it makes, and the root cgroup, kernel threads and system services cost one failed lookup.
 */
enum kpod_cgroup_kind {
	KPOD_CG_KUBEPODS = 1,   /* the kubepods root: not charged */
	KPOD_CG_QOS = 2,        /* burstable, besteffort: not charged */
	KPOD_CG_POD = 3,        /* charged to itself */
	KPOD_CG_CONTAINER = 4,  /* charged to itself, and so is everything below it */
};

struct kpod_watch {
	__u64 charge;  /* the cgroup id to charge; 0: not charged */
	__u32 kind;    /* enum kpod_cgroup_kind */
	__u32 level;   /* depth below the cgroup2 root (kubepods.slice is 1) */
	/* Zero bytes: puts the kinds into the object's BTF for userspace. */
	enum kpod_cgroup_kind kinds[0];
};

struct kpod_watch_cfg {
	__u32 filter;          /* 1: Kubernetes modes (only watched cgroups count); 0: local mode */
	__u32 kubepods_level;  /* level of the kubepods root */
	__u64 kubepods_id;     /* its id; 0: none yet */
};

/*
 * Sized by userspace at four entries per per-cgroup map entry (kubepods, QoS, pod and its
 * containers: a pod's container entries each need a pod entry too); not preallocated, since
 * it is written only at mkdir: memory for the cgroups that exist, not for the capacity.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, KPOD_MAX_ENTRIES);
	__type(key, struct kpod_cgroup_key);
	__type(value, struct kpod_watch);
} kpod_watched SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kpod_watch_cfg);
} kpod_watch_cfg SEC(".maps");

/* The cgroup2 root's id (kernfs' root inode); its tasks (kernel threads among them) never count. */
#define KPOD_ROOT_CGROUP_ID 1
/* Deeper than any real hierarchy; bounds the ancestor reads. */
#define KPOD_MAX_LEVEL 255

/*
 * The id of `cgrp`'s ancestor at `level`.  6.0 replaced cgroup->ancestor_ids[] (ids) with
 * cgroup->ancestors[] (pointers) (commit 7f203bc89eb6, "cgroup: Replace cgroup->ancestor_ids[]
 * with ->ancestors[]"); CO-RE picks whichever the kernel has.  Probe reads: `cgrp` may be a
 * typed or an untyped pointer, and the index is not a constant.
 */
struct cgroup___pre_6_0 {
	__u64 ancestor_ids[0];
} __attribute__((preserve_access_index));

static __always_inline __u64 kpod_ancestor_id(const struct cgroup *cgrp, __u32 level)
{
	unsigned long base = (unsigned long)cgrp;
	__u64 id = 0;

	if (!base || level > KPOD_MAX_LEVEL)
		return 0;
	if (bpf_core_field_exists(((struct cgroup *)0)->ancestors)) {
		struct cgroup *ancestor = NULL;

		bpf_probe_read_kernel(&ancestor, sizeof(ancestor),
				      (void *)(base + bpf_core_field_offset(struct cgroup, ancestors) +
					       level * sizeof(void *)));
		if (ancestor)
			id = BPF_CORE_READ(ancestor, kn, id);
	} else {
		bpf_probe_read_kernel(&id, sizeof(id),
				      (void *)(base + bpf_core_field_offset(struct cgroup___pre_6_0, ancestor_ids) +
					       level * sizeof(__u64)));
	}
	return id;
}

/*
 * A cgroup below a container (`level` deep): its container's id, found among its ancestors,
 * or 0.  Only reached for cgroups deeper than any container, so its probe reads are paid by
 * tasks of nested cgroups alone.
 */
static __always_inline __u64 kpod_charge_nested(const struct kpod_watch_cfg *cfg, const struct cgroup *cgrp,
						__u32 level)
{
	__u32 kubepods = cfg->kubepods_level;
	struct kpod_cgroup_key ancestor;
	struct kpod_watch *w;

	if (kpod_ancestor_id(cgrp, kubepods) != cfg->kubepods_id)
		return 0;  /* deep, but not below kubepods */
	ancestor.cgroup_id = kpod_ancestor_id(cgrp, kubepods + 2);
	w = bpf_map_lookup_elem(&kpod_watched, &ancestor);
	if (w && w->kind == KPOD_CG_CONTAINER)
		return w->charge;
	if (level < kubepods + 4)
		return 0;
	ancestor.cgroup_id = kpod_ancestor_id(cgrp, kubepods + 3);
	w = bpf_map_lookup_elem(&kpod_watched, &ancestor);
	if (w && w->kind == KPOD_CG_CONTAINER)
		return w->charge;
	return 0;
}

/*
 * The first steps of every charge, cheapest first: local mode charges the cgroup itself; the
 * root cgroup (kernel threads) nothing; a watched cgroup its entry.  Returns true when that
 * settled it (`*charge` set); false for an unwatched cgroup that could still be nested in a
 * container (Kubernetes modes only), with `*cfg` set for kpod_charge_nested().
 */
static __always_inline bool kpod_charge_quick(__u64 id, __u64 *charge, struct kpod_watch_cfg **cfg_out)
{
	__u32 zero = 0;
	struct kpod_watch_cfg *cfg = bpf_map_lookup_elem(&kpod_watch_cfg, &zero);
	struct kpod_cgroup_key key = { .cgroup_id = id };
	struct kpod_watch *w;

	*charge = 0;
	if (!cfg || !cfg->filter) {
		*charge = id;
		return true;
	}
	if (id == KPOD_ROOT_CGROUP_ID)
		return true;
	w = bpf_map_lookup_elem(&kpod_watched, &key);
	if (w) {
		*charge = w->charge;
		return true;
	}
	if (!cfg->kubepods_id)
		return true;  /* no kubepods yet: nothing can be nested in a container */
	*cfg_out = cfg;
	return false;
}

/* Containers sit at kubepods + 2 (Guaranteed pods) or + 3: only deeper cgroups can be nested. */
#define KPOD_NESTED_MIN(cfg) ((cfg)->kubepods_level + 3)

/*
 * The cgroup id to charge for an event of `cgrp`, or 0: count nothing.  `cgrp` is a BTF
 * pointer (a tp_btf argument's, or from bpf_get_current_task_btf()): plain loads.
 */
static __always_inline __u64 kpod_charge_cgrp(struct cgroup *cgrp)
{
	struct kpod_watch_cfg *cfg = NULL;
	__u64 charge;
	__u32 level;

	if (kpod_charge_quick(cgrp->kn->id, &charge, &cfg) || !cfg)
		return charge;
	level = cgrp->level;
	if (level < KPOD_NESTED_MIN(cfg))
		return 0;
	return kpod_charge_nested(cfg, cgrp, level);
}

/* The nested-cgroup step through an untyped pointer (probe reads). */
static __always_inline __u64 kpod_charge_nested_read(const struct kpod_watch_cfg *cfg, const struct cgroup *cgrp)
{
	__u32 level;

	if (!cgrp)
		return 0;
	level = BPF_CORE_READ(cgrp, level);
	if (level < KPOD_NESTED_MIN(cfg))
		return 0;
	return kpod_charge_nested(cfg, cgrp, level);
}

/*
 * ...for current.  The nested step reads current's cgroup through bpf_get_current_task_btf()
 * (plain loads) where the kernel has that helper (5.11+, asked of its BTF: the other branch is
 * dropped at load), through probe reads before.
 */
static __always_inline __u64 kpod_charge_current(void)
{
	struct kpod_watch_cfg *cfg = NULL;
	__u64 charge;

	if (kpod_charge_quick(bpf_get_current_cgroup_id(), &charge, &cfg) || !cfg)
		return charge;
	if (bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_get_current_task_btf)) {
		struct cgroup *cgrp = bpf_get_current_task_btf()->cgroups->dfl_cgrp;
		__u32 level = cgrp->level;

		if (level < KPOD_NESTED_MIN(cfg))
			return 0;
		return kpod_charge_nested(cfg, cgrp, level);
	}
	return kpod_charge_nested_read(cfg, BPF_CORE_READ((struct task_struct *)bpf_get_current_task(), cgroups, dfl_cgrp));
}

/* ...for current, where only probe reads work (perf_event programs, kretprobes). */
static __always_inline __u64 kpod_charge_current_read(void)
{
	struct kpod_watch_cfg *cfg = NULL;
	__u64 charge;

	if (kpod_charge_quick(bpf_get_current_cgroup_id(), &charge, &cfg) || !cfg)
		return charge;
	return kpod_charge_nested_read(cfg, BPF_CORE_READ((struct task_struct *)bpf_get_current_task(), cgroups, dfl_cgrp));
}

/* True in Kubernetes modes: a handler may skip per-task work for tasks that will not count. */
static __always_inline bool kpod_filtering(void)
{
	__u32 zero = 0;
	struct kpod_watch_cfg *cfg = bpf_map_lookup_elem(&kpod_watch_cfg, &zero);

	return cfg && cfg->filter;
}

#endif /* __KPOD_BPF_H */
