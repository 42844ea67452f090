// SPDX-License-Identifier: Apache-2.0
/*
 * Syscalls per (cgroup, syscall): count, errors (return value < 0), latency histogram.
 *
 * Only the syscalls userspace wrote into sys_filter (an array indexed by syscall number,
 * filled after load and before attach) are timed.  Every syscall on the node runs both hooks,
 * so an untracked one must cost as little as possible: one bounds check and one array lookup
 * (which the verifier inlines: no helper call), then return.  No timestamp, no map update.
 *
 * Tracked: sys_enter stamps the thread's start time in task-local storage (a slot hanging off
 * the task_struct: a pointer chase instead of a hash lookup, no capacity to outgrow however
 * many threads sit in a blocking syscall, freed by the kernel when the thread exits).
 * sys_exit consumes the stamp and charges current's cgroup (syscalls run in process
 * context).  A syscall is counted at its exit, and only if its entry was seen: one that was
 * already running when we attached is not counted, and the child's return from fork/clone
 * (a sys_exit without a sys_enter) is not a second call.  So count == latency samples.
 */
#include "kpod.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* Syscall numbers we can track (x86_64 and arm64 numbers are well below). */
enum kpod_syscall_layout {
	KPOD_SYSCALL_SLOTS = 1024,
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, KPOD_SYSCALL_SLOTS);
	__type(key, __u32);
	__type(value, __u32);  /* 1 = tracked */
} sys_filter SEC(".maps");

/*
 * One variant exists only so that bench/bpf_net_syscall.py can measure the choice made here
 * (the shipped object is built without it):
 *   KPOD_SYS_RAW_TP      raw_tp instead of tp_btf (untyped args: pt_regs read with a probe read).
 */
/*
 * Start time (ns) of the thread's current tracked syscall; 0 = none in flight.  Task storage,
 * or on kernels before 5.13 (kpod_task_storage cleared by userspace) a hash keyed by tid:
 * see kpod.bpf.h.  The hash route is also what bench/bpf_net_syscall.py measures side by side.
 */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} sys_start SEC(".maps");

KPOD_TASK_STORAGE_FLAG;

#ifdef KPOD_SYS_RAW_TP
#define SYS_HOOK(name) SEC("raw_tp/" name)
#define REGS_READ(regs, field) BPF_CORE_READ(regs, field)
#else
#define SYS_HOOK(name) SEC("tp_btf/" name)
#define REGS_READ(regs, field) ((regs)->field)
#endif

struct sys_key {
	__u64 cgroup_id;
	__u32 nr;
	__u32 _pad;  /* explicit, so the whole key is initialised (hash keys compare bytes) */
};

/*
 * kpod_hist's slots with no `count`: every counted call is one latency sample, so the call
 * count is the sum of the slots (userspace adds them up).  Each atomic add costs ~6 ns and
 * this is the hottest path of all, so the kernel keeps only what cannot be derived.
 */
struct sys_latency {
	__u64 slots[KPOD_HIST_SLOTS];
	__u64 sum;  /* nanoseconds */
	enum kpod_hist_layout layout[0];  /* zero bytes: puts the slot mapping into the BTF */
};

struct sys_value {
	__u32 nr;       /* the key's syscall number again: userspace reads values with it */
	__u32 _pad;
	__u64 errors;   /* returned < 0 */
	struct sys_latency latency;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KPOD_MAX_ENTRIES);
	__type(key, struct sys_key);
	__type(value, struct sys_value);
} sys_stats SEC(".maps");

struct sys_errors_value {
	__u64 sys_filter;  /* never fails (an array); here because every map has a counter */
	__u64 sys_start;
	__u64 sys_stats;
};
KPOD_ERRORS_MAP(sys_errors, struct sys_errors_value);

#define ERR_OFF(map) offsetof(struct sys_errors_value, map)

/* x86 marks 32-bit (int 0x80 / sysenter) syscalls TS_COMPAT: their numbers are the ia32 table's. */
#define KPOD_TS_COMPAT 0x0002
/* arm64: an AArch32 task traps with SPSR.M[4] set (PSR_MODE32_BIT), and its numbers are the
 * arm (EABI) table's, where 3 is read, not io_cancel.  Architectural, unlike a TIF_ number. */
#define KPOD_PSR_MODE32_BIT 0x10

struct thread_info___x86 {
	__u32 status;
} __attribute__((preserve_access_index));

static __always_inline bool tracked(__u64 nr)
{
	__u32 idx = nr;
	__u32 *on;

	/* Also drops -1 (no syscall) and x32's numbers (bit 30 set). */
	if (nr >= KPOD_SYSCALL_SLOTS)
		return false;
	on = bpf_map_lookup_elem(&sys_filter, &idx);
	return on && *on;
}

SYS_HOOK("sys_enter")
int BPF_PROG(sys_enter, struct pt_regs *regs, long id)
{
	struct task_struct *task;
	__u64 *ts;

	if (!tracked(id))
		return 0;
	/*
	 * A typed task pointer (bpf_get_current_task_btf, 5.11+) where task storage exists
	 * (5.13+), an untyped one read with CO-RE probe reads on older kernels.
	 */
	task = kpod_task_storage ? bpf_get_current_task_btf() : (struct task_struct *)bpf_get_current_task();
#ifdef __TARGET_ARCH_x86
	if (bpf_core_field_exists(((struct thread_info___x86 *)0)->status)) {
		struct thread_info___x86 *ti = (struct thread_info___x86 *)&task->thread_info;
		/* A direct load through the typed pointer; a probe read through the untyped one. */
		__u32 status = kpod_task_storage ? ti->status : BPF_CORE_READ(ti, status);

		if (status & KPOD_TS_COMPAT)
			return 0;
	}
#endif
#ifdef __TARGET_ARCH_arm64
	if (REGS_READ(regs, pstate) & KPOD_PSR_MODE32_BIT)
		return 0;
#endif
	ts = kpod_task_stamp(&sys_start, kpod_task_storage, task, true);
	if (!ts) {
		kpod_count_error(&sys_errors, ERR_OFF(sys_start));
		return 0;
	}
	*ts = bpf_ktime_get_ns();
	return 0;
}

SYS_HOOK("sys_exit")
int BPF_PROG(sys_exit, struct pt_regs *regs, long ret)
{
	struct sys_key key = {};
	struct task_struct *task;
	struct sys_value *v;
	__u64 *ts, start, nr;

	/* The tracepoint passes the return value, not the number: read what syscall_get_nr() does. */
#if defined(__TARGET_ARCH_x86)
	nr = REGS_READ(regs, orig_ax);
#elif defined(__TARGET_ARCH_arm64)
	nr = (__u64)(long)REGS_READ(regs, syscallno);
#else
#error "syscall.bpf.c: unsupported architecture"
#endif
	if (!tracked(nr))
		return 0;
	/* No stamp: create nothing here, a syscall without a seen entry is not counted. */
	task = kpod_task_storage ? bpf_get_current_task_btf() : (struct task_struct *)bpf_get_current_task();
	ts = kpod_task_stamp(&sys_start, kpod_task_storage, task, false);
	if (!ts || !*ts)
		return 0;
	start = *ts;
	kpod_task_stamp_done(&sys_start, kpod_task_storage, task, ts);

	key.cgroup_id = bpf_get_current_cgroup_id();
	key.nr = nr;
	v = bpf_map_lookup_elem(&sys_stats, &key);
	if (!v) {
		/* First call of this syscall in this cgroup: the only path building a zeroed value. */
		struct sys_value init = { .nr = nr };

		v = kpod_lookup_or_init(&sys_stats, &key, &init, &sys_errors, ERR_OFF(sys_stats));
		if (!v)
			return 0;
	}
	if (ret < 0)
		__sync_fetch_and_add(&v->errors, 1);
	{
		__u64 delta = bpf_ktime_get_ns() - start;
		__u32 slot = kpod_hist_slot(delta);

		if (slot < KPOD_HIST_SLOTS) {  /* always true; the verifier wants to see it */
			__sync_fetch_and_add(&v->latency.slots[slot], 1);
			__sync_fetch_and_add(&v->latency.sum, delta);
		}
	}
	return 0;
}

/* Only loaded on the tid-hash route: a thread that exits inside a tracked syscall (exit,
 * exit_group, a kill) leaves no stamp behind. */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(sys_forget, struct task_struct *p)
{
	kpod_task_stamp_forget(&sys_start, kpod_task_storage, p);
	return 0;
}
