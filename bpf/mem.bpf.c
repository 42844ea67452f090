// SPDX-License-Identifier: Apache-2.0
/*
 * Memory events per cgroup: OOM kills and major page faults.
 *
 * OOM kills: one per process the OOM killer kills, charged to the VICTIM's cgroup (current
 * is the task whose allocation triggered the OOM killer, often another process).
 *
 * What "killed" means (mm/oom_kill.c, the same from 5.8 to 6.18): __oom_kill_process() counts
 * the kill (count_vm_event(OOM_KILL), memcg_memory_event_mm(MEMCG_OOM_KILL): the oom_kill of
 * /proc/vmstat and memory.events), sends SIGKILL with do_send_sig_info(SIGKILL,
 * SEND_SIG_PRIV, victim, PIDTYPE_TGID), then calls mark_oom_victim(victim), whose tracepoint
 * mark_victim is the only hook in that function.  But mark_oom_victim() also runs WITHOUT a
 * kill: when out_of_memory() finds current already exiting, or oom_kill_process() finds the
 * chosen task already exiting (task_will_free_mem), it only marks it so it can use the
 * memory reserves.  A multi-threaded victim hits that after its kill: each of its threads
 * that allocates before dying enters out_of_memory(), is "already exiting" and is marked,
 * once per thread (TIF_MEMDIE is per thread).  Measured with a mark_victim counter alone:
 * one kill of a 16-thread process counted 2 while memory.oom_control said oom_kill 1.
 *
 * So a mark counts only when it follows the kill's SIGKILL: signal_generate(SIGKILL,
 * SEND_SIG_PRIV, victim) notes the target in a per-CPU slot, and mark_victim for that same
 * thread consumes it.  Between the two the kernel holds task_lock(victim) (taken by
 * find_lock_task_mm(), released after the "Killed process" message), a spinlock: no
 * preemption, so both run on one CPU, back to back.  The "already exiting" marks send no
 * signal, and every mark clears the slot.  The slot also keeps the victim's cgroup as the
 * signal saw it, so kernels whose mark_victim gives only a pid (before 6.8) charge the
 * right cgroup as well.  One process counts once (mem_oom_seen: tgid and its leader's start
 * time): the memory.oom.group kill (cgroup v2; the kubelet sets it for containers since
 * 1.28) sends the victim a second SIGKILL, and a stale slot must never count it twice.
 * If signal_generate cannot be used, oom_victim_exit counts every process that exits marked
 * (signal->oom_mm), through its leader thread: also the "already exiting" ones.
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

/* The last SIGKILL the kernel itself sent on this CPU (tid 0: none pending). */
struct mem_oom_slot_value {
	__u64 at;         /* bpf_ktime_get_ns() */
	__u64 cgroup_id;  /* the target's cgroup at that moment */
	__u64 leader_start;
	__u32 tid;
	__u32 tgid;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mem_oom_slot_value);
} mem_oom_slot SEC(".maps");

/* Processes already counted: tgid -> its leader's start time (tgids are reused). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u64);
} mem_oom_seen SEC(".maps");

struct mem_errors_value {
	__u64 mem_oom_kills;
	__u64 mem_maj_faults;
	__u64 mem_oom_slot;  /* an array: never fails */
	__u64 mem_oom_seen;  /* LRU: never fails */
};
KPOD_ERRORS_MAP(mem_errors, struct mem_errors_value);

#define ERR_OFF(map) offsetof(struct mem_errors_value, map)

#define KPOD_SIGKILL 9
#define KPOD_SEND_SIG_PRIV 1  /* include/linux/sched/signal.h: ((struct kernel_siginfo *) 1) */
/* The kill's signal and mark are microseconds apart under one spinlock; an interrupt could
 * stretch that, a stale slot must not live long. */
#define KPOD_OOM_SLOT_NS (50 * 1000 * 1000ULL)

SEC("tp_btf/signal_generate")
int BPF_PROG(oom_signal, int sig, struct kernel_siginfo *info, struct task_struct *task)
{
	struct mem_oom_slot_value *slot;
	__u32 zero = 0;

	if (sig != KPOD_SIGKILL || (unsigned long)info != KPOD_SEND_SIG_PRIV)
		return 0;
	slot = bpf_map_lookup_elem(&mem_oom_slot, &zero);
	if (!slot)
		return 0;
	slot->at = bpf_ktime_get_ns();
	slot->cgroup_id = kpod_charge_cgrp(task->cgroups->dfl_cgrp);  /* 0: a task that does not count */
	slot->leader_start = task->group_leader->start_time;
	slot->tid = task->pid;
	slot->tgid = task->tgid;
	return 0;
}

/* A mark of thread `tid`: count it if the kill's SIGKILL to that thread came just before. */
static __always_inline void oom_mark(__u32 tid)
{
	struct mem_oom_slot_value *slot;
	struct kpod_cgroup_key key;
	__u32 zero = 0, tgid;
	__u64 *seen, start;

	slot = bpf_map_lookup_elem(&mem_oom_slot, &zero);
	if (!slot)
		return;
	if (slot->tid != tid || !tid || bpf_ktime_get_ns() - slot->at > KPOD_OOM_SLOT_NS) {
		slot->tid = 0;  /* an "already exiting" mark: no kill */
		return;
	}
	slot->tid = 0;
	if (!slot->cgroup_id)
		return;
	tgid = slot->tgid;
	start = slot->leader_start;
	seen = bpf_map_lookup_elem(&mem_oom_seen, &tgid);
	if (seen && *seen == start)
		return;  /* this process was counted already */
	bpf_map_update_elem(&mem_oom_seen, &tgid, &start, BPF_ANY);
	key.cgroup_id = slot->cgroup_id;
	kpod_counter_add(&mem_oom_kills, &key, 1, &mem_errors, ERR_OFF(mem_oom_kills));
}

/* 6.8+: mark_victim(struct task_struct *task, uid_t uid). */
SEC("tp_btf/mark_victim")
int BPF_PROG(oom_mark_victim, struct task_struct *victim)
{
	oom_mark(victim->pid);
	return 0;
}

/* Before 6.8: mark_victim(int pid). */
SEC("raw_tp/mark_victim")
int BPF_PROG(oom_mark_victim_pid, int pid)
{
	oom_mark(pid);
	return 0;
}

/* Without the signal hook: every marked process, when its leader exits. */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(oom_victim_exit, struct task_struct *p)
{
	struct kpod_cgroup_key key;

	if (p->pid != p->tgid || !p->signal->oom_mm)
		return 0;
	key.cgroup_id = kpod_charge_current();
	if (!key.cgroup_id)
		return 0;
	kpod_counter_add(&mem_oom_kills, &key, 1, &mem_errors, ERR_OFF(mem_oom_kills));
	return 0;
}

SEC("perf_event")
int mem_major_fault(struct bpf_perf_event_data *ctx)
{
	struct kpod_cgroup_key key = { .cgroup_id = kpod_charge_current_read() };

	if (!key.cgroup_id)
		return 0;
	kpod_counter_add(&mem_maj_faults, &key, 1, &mem_errors, ERR_OFF(mem_maj_faults));
	return 0;  /* 0: no perf sample is written, we only wanted the callback */
}
