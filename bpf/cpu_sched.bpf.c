// SPDX-License-Identifier: Apache-2.0
/*
 * CPU scheduling per cgroup: run-queue latency and context switches.
 *
 * Run-queue latency is the time from "task became runnable" to "task runs":
 *  - enqueue: sched_wakeup, sched_wakeup_new, and sched_switch for a `prev` that stays
 *    runnable (preempted, or yielded in TASK_RUNNING), stamped in the task's storage;
 *  - dequeue: sched_switch for `next`; the wait is charged to next's cgroup (not to current,
 *    which at sched_switch is still prev).
 * Context switches are counted on switch-OUT, to prev's cgroup: that is exactly where the
 * kernel counts /proc/<pid>/status voluntary_ctxt_switches + nonvoluntary_ctxt_switches.
 * In Kubernetes modes tasks outside pods are neither counted nor stamped (kpod_charge*): a
 * kernel thread's switch costs a lookup, not an atomic on the root cgroup's shared entry.
 * One value struct per cgroup holds both the counter and the histogram, and when prev and
 * next share a cgroup (two tasks of one pod) one hash lookup serves both.
 */
#include "kpod.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* Per cgroup: switches out, and the run-queue wait histogram. */
struct sched_cgroup_value {
	__u64 switches;
	struct kpod_hist runq;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KPOD_MAX_ENTRIES);
	__type(key, struct kpod_cgroup_key);
	__type(value, struct sched_cgroup_value);
} sched_cgroups SEC(".maps");

/*
 * Enqueue timestamp per task, in task-local storage: one slot hangs off each task_struct, so
 * the lookup is a pointer chase instead of a hash, and the kernel frees it when the task
 * exits (no stale entries, nothing to size).  0 = not waiting.
 * Kernels before 5.13 refuse task storage in tracing programs: there userspace clears
 * kpod_task_storage and retypes this map to a HASH keyed by tid (see kpod.bpf.h).
 */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} sched_enqueued SEC(".maps");

KPOD_TASK_STORAGE_FLAG;

struct sched_errors_value {
	__u64 sched_cgroups;
	__u64 sched_enqueued;
};
KPOD_ERRORS_MAP(sched_errors, struct sched_errors_value);

#define ERR_OFF(map) offsetof(struct sched_errors_value, map)

static __always_inline void stamp(struct task_struct *task, __u64 now)
{
	__u64 *ts = kpod_task_stamp(&sched_enqueued, kpod_task_storage, task, true);

	if (ts)
		*ts = now;
	else
		kpod_count_error(&sched_errors, ERR_OFF(sched_enqueued));
}

/* A woken task starts waiting: stamp it, unless it is one that never counts. */
static __always_inline void enqueue(struct task_struct *task, __u64 now)
{
	/* pid 0 is each CPU's idle task: it never waits in a run queue. */
	if (!task->pid)
		return;
	if (kpod_filtering() && !kpod_charge_cgrp(task->cgroups->dfl_cgrp))
		return;
	stamp(task, now);
}

/*
 * tp_btf hands us typed task pointers: plain dereferences (task->pid) compile to direct,
 * fault-safe loads with CO-RE-relocated offsets, cheaper than bpf_probe_read_kernel calls.
 */

SEC("tp_btf/sched_wakeup")
int BPF_PROG(sched_wakeup, struct task_struct *p)
{
	enqueue(p, bpf_ktime_get_ns());
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(sched_wakeup_new, struct task_struct *p)
{
	enqueue(p, bpf_ktime_get_ns());
	return 0;
}

static __always_inline struct sched_cgroup_value *cgroup_stats(struct kpod_cgroup_key *key)
{
	struct sched_cgroup_value *stats = bpf_map_lookup_elem(&sched_cgroups, key);

	if (!stats) {
		/* First event of this cgroup: the only path that pays for a zeroed struct. */
		struct sched_cgroup_value zero = {};

		stats = kpod_lookup_or_init(&sched_cgroups, key, &zero, &sched_errors, ERR_OFF(sched_cgroups));
	}
	return stats;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(sched_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	struct kpod_cgroup_key key = {};
	struct sched_cgroup_value *stats = NULL;
	struct cgroup *next_cgrp;
	__u64 now = 0, *tsp, delta, next_cgroup;

	/* Switch-out.  current is still prev here, so the cheap helper gives prev's cgroup. */
	if (prev->pid && (key.cgroup_id = kpod_charge_current())) {
		stats = cgroup_stats(&key);
		if (stats)
			__sync_fetch_and_add(&stats->switches, 1);
		/*
		 * A preempted prev stays on the run queue even if it had started to set a sleep
		 * state; a prev in TASK_RUNNING yielded and stays runnable too.  Either way its
		 * wait starts now.
		 */
		if (preempt || kpod_btf_task_state(prev) == KPOD_TASK_RUNNING) {
			now = bpf_ktime_get_ns();
			stamp(prev, now);
		}
	}

	/* Switch-in: charge next's wait, if it was stamped, to next's cgroup. */
	if (!next->pid)
		return 0;  /* the idle task */
	tsp = kpod_task_stamp(&sched_enqueued, kpod_task_storage, next, false);
	if (!tsp || !*tsp)
		return 0;  /* not stamped: woken before we attached */
	if (!now)
		now = bpf_ktime_get_ns();
	delta = now - *tsp;
	kpod_task_stamp_done(&sched_enqueued, kpod_task_storage, next, tsp);
	if ((__s64)delta < 0)
		return 0;  /* stamped on another CPU whose clock read later; drop it */
	next_cgrp = next->cgroups->dfl_cgrp;
	next_cgroup = kpod_charge_cgrp(next_cgrp);
	if (!next_cgroup)
		return 0;  /* moved out of its pod while it waited */
	if (!stats || next_cgroup != key.cgroup_id) {
		key.cgroup_id = next_cgroup;
		stats = cgroup_stats(&key);
		if (!stats)
			return 0;
	}
	kpod_hist_add(&stats->runq, delta);
	return 0;
}

/* Only loaded on the tid-hash route: a task that exits while stamped leaves no entry behind. */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(sched_forget, struct task_struct *p)
{
	kpod_task_stamp_forget(&sched_enqueued, kpod_task_storage, p);
	return 0;
}
