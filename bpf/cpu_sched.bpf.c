// SPDX-License-Identifier: Apache-2.0
/*
 * CPU scheduling per cgroup: run-queue latency and context switches.
 *
 * Run-queue latency is the time from "task became runnable" to "task runs":
 *  - enqueue: sched_wakeup, sched_wakeup_new, and sched_switch for a `prev` that stays
 *    runnable (it was preempted), stamped in sched_enqueued[pid];
 *  - dequeue: sched_switch for `next`; the wait is charged to next's cgroup (not to current,
 *    which at sched_switch is still prev).
 * Context switches are counted on switch-OUT, to prev's cgroup: that is where the kernel
 * counts /proc/<pid>/status voluntary_ctxt_switches + nonvoluntary_ctxt_switches.
 */
#include "kpod.bpf.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KPOD_MAX_ENTRIES);
	__type(key, struct kpod_cgroup_key);
	__type(value, struct kpod_hist);
} sched_runq_lat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KPOD_MAX_ENTRIES);
	__type(key, struct kpod_cgroup_key);
	__type(value, __u64);
} sched_switches SEC(".maps");

/*
 * Enqueue timestamps per thread id.  Entries live from wakeup to switch-in, so only runnable
 * threads occupy it; LRU evicts the odd stale one (a thread that died runnable).
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KPOD_MAX_ENTRIES);
	__type(key, __u32);
	__type(value, __u64);
} sched_enqueued SEC(".maps");

struct sched_errors_value {
	__u64 sched_runq_lat;
	__u64 sched_switches;
	__u64 sched_enqueued;
};
KPOD_ERRORS_MAP(sched_errors, struct sched_errors_value);

#define ERR_OFF(map) offsetof(struct sched_errors_value, map)

static __always_inline void enqueue(__u32 pid, __u64 now)
{
	/* pid 0 is each CPU's idle task: it never waits in a run queue. */
	if (!pid)
		return;
	if (bpf_map_update_elem(&sched_enqueued, &pid, &now, BPF_ANY))
		kpod_count_error(&sched_errors, ERR_OFF(sched_enqueued));
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(sched_wakeup, struct task_struct *p)
{
	enqueue(BPF_CORE_READ(p, pid), bpf_ktime_get_ns());
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(sched_wakeup_new, struct task_struct *p)
{
	enqueue(BPF_CORE_READ(p, pid), bpf_ktime_get_ns());
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(sched_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	struct kpod_cgroup_key key = {};
	struct kpod_hist zero = {}, *hist;
	__u64 now = bpf_ktime_get_ns(), *tsp, delta;
	__u32 prev_pid = BPF_CORE_READ(prev, pid), next_pid = BPF_CORE_READ(next, pid);

	/* Switch-out: current is still prev here, so the cheap helper gives prev's cgroup. */
	if (prev_pid) {
		key.cgroup_id = bpf_get_current_cgroup_id();
		kpod_counter_add(&sched_switches, &key, 1, &sched_errors, ERR_OFF(sched_switches));
		/*
		 * A preempted prev stays on the run queue even if it had started to set a sleep
		 * state; a prev in TASK_RUNNING yielded and stays runnable too.  Either way its
		 * wait starts now.
		 */
		if (preempt || kpod_task_state(prev) == KPOD_TASK_RUNNING)
			enqueue(prev_pid, now);
	}

	/* Switch-in: charge next's wait to next's cgroup. */
	tsp = bpf_map_lookup_elem(&sched_enqueued, &next_pid);
	if (!tsp)
		return 0;  /* enqueued before we attached */
	delta = now - *tsp;
	bpf_map_delete_elem(&sched_enqueued, &next_pid);
	if ((__s64)delta < 0)
		return 0;  /* stamped on another CPU whose clock read later; drop it */

	key.cgroup_id = kpod_task_cgroup_id(next);
	hist = kpod_lookup_or_init(&sched_runq_lat, &key, &zero, &sched_errors, ERR_OFF(sched_runq_lat));
	if (hist)
		kpod_hist_add(hist, delta);
	return 0;
}
