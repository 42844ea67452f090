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

#endif /* __KPOD_BPF_H */
