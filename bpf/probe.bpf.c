// SPDX-License-Identifier: Apache-2.0
/*
 * Feature probes, loaded one program at a time by kpod/kernel/probes.py and never attached:
 * whether the verifier accepts a program is the answer, whatever the kernel's version says
 * (distributions backport features, and configs differ).
 */
#include "kpod.bpf.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} probe_task_map SEC(".maps");

/*
 * Task-local storage from a tracing program: the map type exists since 5.11 (for BPF LSM),
 * its helpers were allowed in tracing programs in 5.13 (commit a10787e6d58c "bpf: Enable
 * task local storage for tracing programs").  Before 5.11 the map cannot even be created.
 */
SEC("tp_btf/sched_switch")
int BPF_PROG(probe_task_storage)
{
	bpf_task_storage_get(&probe_task_map, bpf_get_current_task_btf(), 0, 0);
	return 0;
}

/*
 * fentry/fexit on a kernel function needs a BPF trampoline, which arm64 only has since 6.4
 * (ftrace direct calls); before, loading works and attaching fails with ENOTSUPP.  The
 * target is set by userspace (bpf_program__set_attach_target) to the function in question.
 */
SEC("fexit/tcp_sendmsg")
int BPF_PROG(probe_fexit)
{
	return 0;
}
