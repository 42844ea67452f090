"""Cgroup access: where the cgroups are mounted (mounts), which cgroup an id means (index),
reading their files (files) and the pure parsers of those files (parsers).  The cgroup-file
receivers build on `files`; the agent builds the `CgroupIndex` every component gets in its
Context."""
