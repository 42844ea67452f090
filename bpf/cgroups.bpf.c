// SPDX-License-Identifier: Apache-2.0
/*
 * Cgroups as they come and go: the kernel's cgroup_mkdir / cgroup_rmdir tracepoints.
 *
 * Two jobs, one object (userspace: kpod/kernel/cgroupwatch.py):
 *  1. Tell userspace about every cgroup created or removed, with its id and path, through a
 *     ring buffer it drains at the start of each cycle.  A container that is created, works
 *     and is removed between two cycles is then still known by its path (its pod uid and
 *     container id), and a removed cgroup's counts can be exported under the labels it had.
 *  2. Keep kpod_watched current (Kubernetes modes): a new child of the kubepods root is a QoS
 *     cgroup or a pod, a child of a QoS cgroup a pod, a child of a pod a container; each gets
 *     its entry at mkdir, before its first task can run, so every other object charges it
 *     from its first event (see kpod_charge_cgrp() in kpod.bpf.h).  Cgroups below a container get
 *     no entry (they are charged to their container) and no event.  In local mode every
 *     cgroup2 mkdir and rmdir is an event and kpod_watched stays unused.
 *
 * The tracepoints (kernel/cgroup/cgroup.c, 5.8 to 6.18): TRACE_CGROUP_PATH(mkdir, cgrp) at the
 * end of cgroup_mkdir(), once the cgroup is live; TRACE_CGROUP_PATH(rmdir, cgrp) in
 * cgroup_rmdir() after cgroup_destroy_locked() succeeded.  `path` is cgroup_path() into the
 * kernel's trace buffer of TRACE_CGROUP_PATH_LEN (1024) bytes, relative to the hierarchy's
 * root.  They fire for every hierarchy; cgroup2's root (cgrp_dfl_root) is set up first at
 * boot and has hierarchy id 0 (cgroup_init() -> cgroup_setup_root(&cgrp_dfl_root, 0) ->
 * cgroup_init_root_id(), the first idr_alloc_cyclic() from 0), v1 hierarchies count from 1.
 * Entries of removed cgroups stay in kpod_watched (a socket can outlive its cgroup); userspace
 * deletes them when it lets the cgroup go.
 */
#include "kpod.bpf.h"

char LICENSE[] SEC("license") = "GPL";

enum kpod_cgroup_event {
	KPOD_CGROUP_MKDIR = 1,
	KPOD_CGROUP_RMDIR = 2,
};

/* include/linux/cgroup.h TRACE_CGROUP_PATH_LEN: the kernel's paths are at most this long. */
#define KPOD_CGROUP_PATH_MAX 1024

/* One ring-buffer record: the header, then the path's bytes (no terminating NUL). */
struct cgroup_event {
	__u64 id;
	__u32 event;  /* enum kpod_cgroup_event */
	__u32 level;
	__u32 path_len;
	__u32 _pad;
	char path[KPOD_CGROUP_PATH_MAX];
	enum kpod_cgroup_event events[0];  /* zero bytes: the event kinds, for userspace's BTF */
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} cgroup_events SEC(".maps");

/* Scratch space for a record (too big for the 512-byte stack). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cgroup_event);
} cgroup_scratch SEC(".maps");

struct cgroups_errors_value {
	__u64 kpod_watched;    /* inserts that failed (map full): that cgroup is not charged */
	__u64 kpod_watch_cfg;  /* an array: never fails */
	__u64 cgroup_events;   /* records dropped: the ring buffer was full (userspace walks then) */
	__u64 cgroup_scratch;  /* an array: never fails */
};
KPOD_ERRORS_MAP(cgroups_errors, struct cgroups_errors_value);

#define ERR_OFF(map) offsetof(struct cgroups_errors_value, map)

/* The cgroup's directory name, NUL-terminated, in `name` (as much as fits). */
static __always_inline void cgroup_name(struct cgroup *cgrp, char *name, __u32 size)
{
	bpf_probe_read_kernel_str(name, size, cgrp->kn->name);
}

/*
 * Exact compare of a name against a literal, its NUL included.  `n` is a constant once
 * inlined, so clang unrolls this into constant-index compares: nothing for the verifier to
 * bound, no memcmp (BPF has none).
 */
static __always_inline bool name_is(const char *name, const char *lit, int n)
{
#pragma unroll
	for (int i = 0; i < 32; i++) {
		if (i >= n)
			break;
		if (name[i] != lit[i])
			return false;
	}
	return true;
}

#define NAME_IS(name, lit) name_is((name), (lit), sizeof(lit))

static __always_inline bool kubepods_name(const char *name)
{
	/* The kubelet's systemd and cgroupfs drivers (processors/k8sattributes/podpath.py). */
	return NAME_IS(name, "kubepods.slice") || NAME_IS(name, "kubepods");
}

static __always_inline bool qos_name(const char *name)
{
	return NAME_IS(name, "kubepods-burstable.slice") || NAME_IS(name, "kubepods-besteffort.slice") ||
	       NAME_IS(name, "burstable") || NAME_IS(name, "besteffort");
}

/*
 * Give a new cgroup its kpod_watched entry if it is a pod-level one.  True if it is watched
 * (it is then worth an event).
 */
static __always_inline bool watch_new(struct kpod_watch_cfg *cfg, struct cgroup *cgrp, __u64 id, __u32 level)
{
	struct kpod_watch entry = { .level = level };
	struct kpod_cgroup_key key = { .cgroup_id = id }, parent_key;
	struct kpod_watch *parent;
	char name[32] = {};

	if (!level)
		return false;
	parent_key.cgroup_id = kpod_ancestor_id(cgrp, level - 1);
	parent = bpf_map_lookup_elem(&kpod_watched, &parent_key);
	if (!parent) {
		/* The kubelet's top cgroup, made after we started (userspace found the others). */
		if (level != 1)
			return false;
		cgroup_name(cgrp, name, sizeof(name));
		if (!kubepods_name(name))
			return false;
		entry.kind = KPOD_CG_KUBEPODS;
		cfg->kubepods_id = id;
		cfg->kubepods_level = level;
	} else if (parent->kind == KPOD_CG_KUBEPODS) {
		cgroup_name(cgrp, name, sizeof(name));
		entry.kind = qos_name(name) ? KPOD_CG_QOS : KPOD_CG_POD;
	} else if (parent->kind == KPOD_CG_QOS) {
		entry.kind = KPOD_CG_POD;
	} else if (parent->kind == KPOD_CG_POD) {
		entry.kind = KPOD_CG_CONTAINER;
	} else {
		return false;  /* below a container: charged to it, no entry */
	}
	if (entry.kind >= KPOD_CG_POD)
		entry.charge = id;
	if (bpf_map_update_elem(&kpod_watched, &key, &entry, BPF_ANY))
		kpod_count_error(&cgroups_errors, ERR_OFF(kpod_watched));
	return true;
}

static __always_inline void emit(__u32 event, __u64 id, __u32 level, const char *path)
{
	struct cgroup_event *rec;
	__u32 zero = 0;
	long len;

	rec = bpf_map_lookup_elem(&cgroup_scratch, &zero);
	if (!rec)
		return;
	rec->id = id;
	rec->event = event;
	rec->level = level;
	len = bpf_probe_read_kernel_str(rec->path, sizeof(rec->path), path);
	if (len < 1)
		len = 1;  /* an unreadable path: an empty one, userspace walks for it */
	rec->path_len = len - 1;
	len += offsetof(struct cgroup_event, path) - 1;
	if (len > sizeof(*rec))  /* cannot happen; bounds the size for the verifier */
		return;
	if (bpf_ringbuf_output(&cgroup_events, rec, len, 0))
		kpod_count_error(&cgroups_errors, ERR_OFF(cgroup_events));
}

static __always_inline struct kpod_watch_cfg *watch_cfg(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&kpod_watch_cfg, &zero);
}

SEC("tp_btf/cgroup_mkdir")
int BPF_PROG(cgroup_mkdir, struct cgroup *cgrp, const char *path)
{
	struct kpod_watch_cfg *cfg;
	__u64 id;
	__u32 level;

	if (cgrp->root->hierarchy_id != 0)
		return 0;  /* a v1 hierarchy */
	cfg = watch_cfg();
	if (!cfg)
		return 0;
	id = cgrp->kn->id;
	level = cgrp->level;
	if (cfg->filter && !watch_new(cfg, cgrp, id, level))
		return 0;
	emit(KPOD_CGROUP_MKDIR, id, level, path);
	return 0;
}

SEC("tp_btf/cgroup_rmdir")
int BPF_PROG(cgroup_rmdir, struct cgroup *cgrp, const char *path)
{
	struct kpod_cgroup_key key;
	struct kpod_watch_cfg *cfg;
	__u64 id;

	if (cgrp->root->hierarchy_id != 0)
		return 0;
	cfg = watch_cfg();
	if (!cfg)
		return 0;
	id = cgrp->kn->id;
	key.cgroup_id = id;
	if (cfg->filter) {
		if (!bpf_map_lookup_elem(&kpod_watched, &key))
			return 0;  /* not a pod-level cgroup */
		if (id == cfg->kubepods_id)
			cfg->kubepods_id = 0;
	}
	emit(KPOD_CGROUP_RMDIR, id, cgrp->level, path);
	return 0;
}
