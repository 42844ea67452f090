// SPDX-License-Identifier: Apache-2.0
/*
 * Memory events per cgroup: OOM kills and major page faults.
 *
 * OOM kills are charged to the VICTIM's cgroup: tp_btf/mark_victim hands us the victim task
 * (since 6.8; current is the task whose allocation triggered the OOM killer, often another
 * process).  Before 6.8 mark_victim passes only a pid; the fallback then counts the victim
 * when it exits: mark_oom_victim() set its signal->oom_mm, and at sched_process_exit the
 * exiting task is current, still in its own cgroup.  It counts the thread-group leader only
 * (once per process), so a victim whose leader thread had already exited is missed.
 *
 * Major faults come from a perf software event, PERF_COUNT_SW_PAGE_FAULTS_MAJ with
 * sample_period 1, opened per CPU by userspace: the kernel raises it in mm_account_fault()
 * exactly when it counts the task's maj_flt (VM_FAULT_MAJOR, or a retried fault), in the
 * faulting task's context, so current's cgroup is the right owner.
 */
#include "kpod.bpf.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KPOD_MAX_ENTRIES);
	__type(key, struct kpod_cgroup_key);
	__type(value, __u64);
} mem_oom_kills SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KPOD_MAX_ENTRIES);
	__type(key, struct kpod_cgroup_key);
	__type(value, __u64);
} mem_maj_faults SEC(".maps");

struct mem_errors_value {
	__u64 mem_oom_kills;
	__u64 mem_maj_faults;
};
KPOD_ERRORS_MAP(mem_errors, struct mem_errors_value);

#define ERR_OFF(map) offsetof(struct mem_errors_value, map)

SEC("tp_btf/mark_victim")
int BPF_PROG(oom_mark_victim, struct task_struct *victim)
{
	struct kpod_cgroup_key key = { .cgroup_id = kpod_task_cgroup_id(victim) };

	kpod_counter_add(&mem_oom_kills, &key, 1, &mem_errors, ERR_OFF(mem_oom_kills));
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(oom_victim_exit, struct task_struct *p)
{
	struct kpod_cgroup_key key;

	if (p->pid != p->tgid || !p->signal->oom_mm)
		return 0;
	key.cgroup_id = bpf_get_current_cgroup_id();
	kpod_counter_add(&mem_oom_kills, &key, 1, &mem_errors, ERR_OFF(mem_oom_kills));
	return 0;
}

SEC("perf_event")
int mem_major_fault(struct bpf_perf_event_data *ctx)
{
	struct kpod_cgroup_key key = { .cgroup_id = bpf_get_current_cgroup_id() };

	kpod_counter_add(&mem_maj_faults, &key, 1, &mem_errors, ERR_OFF(mem_maj_faults));
	return 0;  /* 0: no perf sample is written, we only wanted the callback */
}
