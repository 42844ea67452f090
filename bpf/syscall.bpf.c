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
 *
 * Restarted syscalls.  A blocking call interrupted by a signal leaves the kernel with
 * -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND or -ERESTART_RESTARTBLOCK (include/linux/
 * errno.h: 512, 513, 514, 516; 515 is ENOIOCTLCMD, a real error).  sys_exit sees that value
 * BEFORE the signal is handled (syscall_exit_work -> trace_sys_exit, then
 * exit_to_user_mode_loop -> arch_do_signal_or_restart; on 5.8 x86 syscall_slow_exit_work,
 * then do_signal; arm64 the same order), and only signal handling decides what it means
 * (arch/x86/kernel/signal.c handle_signal and the no-handler path; arm64 do_signal agrees):
 *   - a handler runs: NOINTR restarts; RESTARTSYS restarts if the handler has SA_RESTART;
 *     NOHAND, RESTART_RESTARTBLOCK and RESTARTSYS without SA_RESTART become -EINTR;
 *   - no handler (a stop and continue, an ignored or default-ignored signal, the freezer):
 *     every code restarts, RESTART_RESTARTBLOCK through restart_syscall(2).
 * So a restart code neither ends the call nor is an error: sys_exit parks the call (its first
 * entry time and number), signal_deliver (get_signal, just before a handler is chosen: the
 * same place that decides above) turns it into one call ending with -EINTR when the handler
 * makes it one, and the re-entry of the same syscall (or restart_syscall) picks the parked
 * start up again.  One restarted read() that blocked 0.5 s while a timer interrupted it 25
 * times is one call, no error, 0.5 s.  What this cannot see: a handler that longjmps out of
 * a restarting call leaves it parked until the thread's next call of the same syscall.
 */
#include "kpod.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* Syscall numbers we can track (x86_64 and arm64 numbers are well below). */
enum kpod_syscall_layout {
	KPOD_SYSCALL_SLOTS = 1024,
};

/* sys_filter values: tracked, or restart_syscall(2), which only resumes a parked call. */
enum kpod_sys_filter {
	KPOD_SYS_UNTRACKED = 0,
	KPOD_SYS_TRACKED = 1,
	KPOD_SYS_RESTART = 2,
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, KPOD_SYSCALL_SLOTS);
	__type(key, __u32);
	__type(value, __u32);  /* enum kpod_sys_filter */
} sys_filter SEC(".maps");

/*
 * Per thread: the tracked call in flight and a call the kernel is restarting.  0 = none.
 * restart_code is the -ERESTART* value until a handler decides "restart", then 0.
 */
struct sys_inflight {
	__u64 start;          /* entry time (ns) of the call in flight */
	__u64 charge;         /* Kubernetes modes: the cgroup to charge, as at entry; 0: current's at the end */
	__u64 restart_start;  /* first entry time of a parked call */
	__u32 nr;             /* the in-flight call's syscall number */
	__u32 restart_nr;     /* the parked call's syscall number */
	__s32 restart_code;
	__u32 _pad;
};

/*
 * One variant exists only so that bench/bpf_net_syscall.py can measure the choice made here
 * (the shipped object is built without it):
 *   KPOD_SYS_RAW_TP      raw_tp instead of tp_btf (untyped args: pt_regs read with a probe read).
 */
/*
 * The thread's struct sys_inflight.  Task storage, or on kernels before 5.13
 * (kpod_task_storage cleared by userspace) a hash keyed by tid: see kpod.bpf.h.  The hash route
 * is also what bench/bpf_net_syscall.py measures side by side.
 */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sys_inflight);
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

static __always_inline __u32 tracked(__u64 nr)
{
	__u32 idx = nr;
	__u32 *on;

	/* Also drops -1 (no syscall) and x32's numbers (bit 30 set). */
	if (nr >= KPOD_SYSCALL_SLOTS)
		return KPOD_SYS_UNTRACKED;
	on = bpf_map_lookup_elem(&sys_filter, &idx);
	return on ? *on : KPOD_SYS_UNTRACKED;
}

/* include/linux/errno.h: the kernel-internal restart codes (never seen by userspace). */
#define KPOD_ERESTARTSYS 512
#define KPOD_ERESTARTNOINTR 513
#define KPOD_ERESTARTNOHAND 514
#define KPOD_ERESTART_RESTARTBLOCK 516
#define KPOD_EINTR 4
/* include/uapi/asm-generic/signal-defs.h (x86 and arm64 alike) */
#define KPOD_SA_RESTART 0x10000000
#define KPOD_SIG_IGN 1

static __always_inline bool restart_code(long ret)
{
	return ret == -KPOD_ERESTARTSYS || ret == -KPOD_ERESTARTNOINTR || ret == -KPOD_ERESTARTNOHAND ||
	       ret == -KPOD_ERESTART_RESTARTBLOCK;
}

/* The task current is, typed where task storage exists (5.13+, so 5.11's helper), else untyped. */
static __always_inline struct task_struct *current_task(void)
{
	return kpod_task_storage ? bpf_get_current_task_btf() : (struct task_struct *)bpf_get_current_task();
}

/* This thread's in-flight state (kpod_task_stamp's pattern with a struct), created if `create`. */
static __always_inline struct sys_inflight *inflight(struct task_struct *task, bool create)
{
	struct sys_inflight zero = {}, *s;
	__u32 tid;
	long rc;

	if (kpod_task_storage)
		return bpf_task_storage_get(&sys_start, task, 0, create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
	tid = BPF_CORE_READ(task, pid);
	s = bpf_map_lookup_elem(&sys_start, &tid);
	if (s || !create)
		return s;
	rc = bpf_map_update_elem(&sys_start, &tid, &zero, BPF_NOEXIST);
	if (rc && rc != -KPOD_EEXIST)
		return NULL;
	return bpf_map_lookup_elem(&sys_start, &tid);
}

/* Nothing in flight nor parked: the tid hash lets the entry go (task storage keeps its slot). */
static __always_inline void inflight_idle(struct task_struct *task, struct sys_inflight *s)
{
	if (!s->start && !s->restart_start)
		kpod_task_stamp_forget(&sys_start, kpod_task_storage, task);
}

/* One finished call: count it, an error if ret < 0, its latency since `start`.  `charge`:
 * the cgroup taken at entry (Kubernetes modes), or 0 for current's (local mode). */
static __always_inline void account(__u64 charge, __u32 nr, long ret, __u64 start)
{
	struct sys_key key = { .cgroup_id = charge ? charge : bpf_get_current_cgroup_id(), .nr = nr };
	struct sys_value *v = bpf_map_lookup_elem(&sys_stats, &key);
	__u64 delta;
	__u32 slot;

	if (!v) {
		/* First call of this syscall in this cgroup: the only path building a zeroed value. */
		struct sys_value init = { .nr = nr };

		v = kpod_lookup_or_init(&sys_stats, &key, &init, &sys_errors, ERR_OFF(sys_stats));
		if (!v)
			return;
	}
	if (ret < 0)
		__sync_fetch_and_add(&v->errors, 1);
	delta = bpf_ktime_get_ns() - start;
	slot = kpod_hist_slot(delta);
	if (slot < KPOD_HIST_SLOTS) {  /* always true; the verifier wants to see it */
		__sync_fetch_and_add(&v->latency.slots[slot], 1);
		__sync_fetch_and_add(&v->latency.sum, delta);
	}
}

SYS_HOOK("sys_enter")
int BPF_PROG(sys_enter, struct pt_regs *regs, long id)
{
	struct task_struct *task;
	struct sys_inflight *s;
	__u32 on = tracked(id);
	__u64 charge = 0;

	if (on == KPOD_SYS_UNTRACKED)
		return 0;
	/* Kubernetes modes: a task of no pod gets no stamp (and so no count at exit). */
	if (kpod_filtering() && !(charge = kpod_charge_current()))
		return 0;
	/*
	 * A typed task pointer (bpf_get_current_task_btf, 5.11+) where task storage exists
	 * (5.13+), an untyped one read with CO-RE probe reads on older kernels.
	 */
	task = current_task();
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
	if (on == KPOD_SYS_RESTART) {
		/* restart_syscall(2) resumes a parked call (-ERESTART_RESTARTBLOCK, no handler). */
		s = inflight(task, false);
		if (s && s->restart_start) {
			s->start = s->restart_start;
			s->nr = s->restart_nr;
			s->restart_start = 0;
		}
		return 0;
	}
	s = inflight(task, true);
	if (!s) {
		kpod_count_error(&sys_errors, ERR_OFF(sys_start));
		return 0;
	}
	if (s->restart_start && s->restart_nr == id) {
		/* The kernel re-entered a parked call: it goes on from its first entry. */
		s->start = s->restart_start;
		s->nr = id;
		s->restart_start = 0;
		return 0;
	}
	s->start = bpf_ktime_get_ns();
	s->charge = charge;
	s->nr = id;
	return 0;
}

SYS_HOOK("sys_exit")
int BPF_PROG(sys_exit, struct pt_regs *regs, long ret)
{
	struct task_struct *task;
	struct sys_inflight *s;
	__u64 start, nr;

	/* The tracepoint passes the return value, not the number: read what syscall_get_nr() does. */
#if defined(__TARGET_ARCH_x86)
	nr = REGS_READ(regs, orig_ax);
#elif defined(__TARGET_ARCH_arm64)
	nr = (__u64)(long)REGS_READ(regs, syscallno);
#else
#error "syscall.bpf.c: unsupported architecture"
#endif
	if (tracked(nr) == KPOD_SYS_UNTRACKED)
		return 0;
	/* No state: create nothing here, a syscall without a seen entry is not counted. */
	task = current_task();
	s = inflight(task, false);
	if (!s || !s->start)
		return 0;
	start = s->start;
	s->start = 0;
	if (restart_code(ret)) {
		/* Not over yet, not an error: parked until signal handling says what it becomes. */
		s->restart_start = start;
		s->restart_nr = s->nr;
		s->restart_code = ret;
		return 0;
	}
	account(s->charge, s->nr, ret, start);
	inflight_idle(task, s);
	return 0;
}

/*
 * get_signal() traces each signal it dequeues right before it looks at the action (kernel/
 * signal.c, the same in 5.8 and 6.x): a handler (not SIG_DFL, not SIG_IGN) is what decides
 * between restart and -EINTR for a parked call.  Only the first handler decides: once the
 * kernel has rewound the call for a restart, later handlers no longer see an error code
 * (x86: regs->ax is the syscall number again; arm64: forget_syscall()).
 */
SEC("tp_btf/signal_deliver")
int BPF_PROG(sys_signal, int sig, struct kernel_siginfo *info, struct k_sigaction *ka)
{
	struct task_struct *task;
	struct sys_inflight *s;
	unsigned long handler;
	__s32 code;

	handler = (unsigned long)ka->sa.sa_handler;
	if (handler <= KPOD_SIG_IGN)  /* SIG_DFL (0) or SIG_IGN (1): no handler runs */
		return 0;
	task = current_task();
	s = inflight(task, false);
	if (!s || !s->restart_start || !s->restart_code)
		return 0;
	code = s->restart_code;
	if (code == -KPOD_ERESTARTNOINTR || (code == -KPOD_ERESTARTSYS && (ka->sa.sa_flags & KPOD_SA_RESTART))) {
		s->restart_code = 0;  /* restarted: the re-entry resumes it */
		return 0;
	}
	/* The call ends here with -EINTR, which is what the caller sees. */
	account(s->charge, s->restart_nr, -KPOD_EINTR, s->restart_start);
	s->restart_start = 0;
	inflight_idle(task, s);
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
