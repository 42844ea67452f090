# kpod-metrics: `make run` and `make test` are all a newcomer needs (Debian/Ubuntu, as root).
SHELL := /bin/bash
.DEFAULT_GOAL := run

VENV      ?= .venv
PY        := $(VENV)/bin/python
PYTEST    := $(VENV)/bin/pytest
CONFIG    ?= config.example.yaml

# `make image` and the container tests: Debian's engine and runtime, mmdebstrap for the base image.
CONTAINER_PACKAGES := podman buildah runc mmdebstrap
# System packages: the BPF toolchain, libbpf's runtime, promtool (tests lint the exposition
# with it), iproute2 (network-namespace tests), bpftrace and perf (benchmarks compare with them),
# openssl (test certificates), busybox-static (its cpio reads the VM's initramfs back).  A test
# that needs one of these fails when it is missing (tests/README.md).
APT_PACKAGES := clang llvm libbpf-dev libbpf1 bpftool prometheus iproute2 python3-venv \
                python3-dev bpftrace linux-perf util-linux e2fsprogs openssl busybox-static \
                $(CONTAINER_PACKAGES)

ARCH      := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
# BPF_OUT: where vmlinux.h and the objects go (bpf/ for this machine; `make bpf-arm64` builds
# the arm64 ones elsewhere, so the host's own objects are never replaced by another arch's).
BPF_OUT   ?= bpf
BPF_SRC   := $(wildcard bpf/*.bpf.c)
BPF_OBJ   := $(patsubst bpf/%.bpf.c,$(BPF_OUT)/%.bpf.o,$(BPF_SRC))
BPF_HDR   := $(filter-out bpf/vmlinux.h,$(wildcard bpf/*.h))
CLANG     ?= clang
LLVM_STRIP ?= llvm-strip
# -I $(BPF_OUT) first: kpod.bpf.h includes <vmlinux.h>, which must be the target's.
BPF_CFLAGS := -O2 -g -Wall -Werror -target bpf -D__TARGET_ARCH_$(ARCH) -I $(BPF_OUT) -I bpf

.PHONY: setup run test test-all bench lint fmt bpf bpf-arm64 clean system-packages venv fuzz soak vm-setup test-vm \
        vm-setup-arm64 test-vm-arm64 wheel manifests docs image base-image container-packages

setup: system-packages venv bpf

# Idempotent: apt runs only when a package is missing.
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

# vmlinux.h is generated from the build machine's BTF; CO-RE relocates field offsets at load
# time, so objects built here run on other kernels with BTF.
# VMLINUX_BTF: another kernel's BTF (e.g. an arm64 node's /sys/kernel/btf/vmlinux) to build for that
# architecture with ARCH=arm64 (see deploy/README.md, "Multi-arch").
VMLINUX_BTF ?= /sys/kernel/btf/vmlinux
# A BTF file (not the running kernel's) is a prerequisite: a newer one regenerates vmlinux.h.
$(BPF_OUT)/vmlinux.h: $(filter-out /sys/%,$(VMLINUX_BTF))
	@test -r $(VMLINUX_BTF) || { echo "$@: $(VMLINUX_BTF) is missing (kernel without BTF)"; exit 2; }
	@mkdir -p $(BPF_OUT)
	bpftool btf dump file $(VMLINUX_BTF) format c > $@.tmp && mv $@.tmp $@

# -g emits BTF (CO-RE needs it); llvm-strip -g then drops the DWARF, which nothing at runtime
# reads (the .BTF and .BTF.ext sections stay): the objects shrink from ~650 KB to ~20 KB.
$(BPF_OUT)/%.bpf.o: bpf/%.bpf.c $(BPF_OUT)/vmlinux.h $(BPF_HDR)
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@.tmp
	$(LLVM_STRIP) -g $@.tmp
	mv $@.tmp $@

bpf: $(BPF_OBJ)

# The arm64 objects, against the BTF of Debian 12's arm64 kernel (carved from its package by
# scripts/debian_kernel.py), into the arm64 VM's layer: the guest sees them over bpf/.
VM_ARM64 := build/vm-arm64
ARM64_BTF ?= $(VM_ARM64)/vmlinux.btf
$(VM_ARM64)/vmlinux.btf:
	python3 scripts/debian_kernel.py btf --arch arm64 --out $@
bpf-arm64: $(ARM64_BTF)
	$(MAKE) --no-print-directory bpf ARCH=arm64 VMLINUX_BTF=$(ARM64_BTF) BPF_OUT=$(VM_ARM64)/layer/bpf

# deploy/btf/vmlinux-<arch>.btf (gitignored), for an image build of <arch> on another arch.
deploy/btf/vmlinux-%.btf:
	python3 scripts/debian_kernel.py btf --arch $* --out $@

run: setup
	$(VENV)/bin/kpod-metrics run --config $(CONFIG)

# TEST_VM=0 skips the 6.1 VMs (make test-vm, ~3.5 min alone, up to ~7 when the host is busy;
# make test-vm-arm64, ~4 min).  TEST_VM_ARM64=0 skips only the arm64 one.
TEST_VM ?= 1
TEST_VM_ARM64 ?= 1

# The eBPF ground-truth tests once more on the older kernels' routes (kpod.bpf.force_routes):
# per-task stamps in a tid hash (< 5.13), the pre-5.15 socket cgroup layout, kprobes instead of
# fentry/fexit.  On the host and in both VMs (docs/KERNELS.md).
FORCED_ROUTES ?= tid_hash,sock_cgroup_val,kprobe
FORCED_TESTS  ?= tests/test_bpf_receivers.py tests/test_bpf_syscall.py tests/test_bpf_net.py

test: setup
	$(VENV)/bin/ruff check .
	$(PYTEST) -q
	KPOD_BPF_FORCE_ROUTES=$(FORCED_ROUTES) $(PYTEST) -q -p no:cacheprovider $(FORCED_TESTS)
	@if [ "$(TEST_VM)" = 1 ]; then $(MAKE) --no-print-directory test-vm; else echo "TEST_VM=0: make test-vm skipped"; fi
	@if [ "$(TEST_VM)" = 1 ] && [ "$(TEST_VM_ARM64)" = 1 ]; then $(MAKE) --no-print-directory test-vm-arm64; \
	  else echo "make test-vm-arm64 skipped (TEST_VM=$(TEST_VM) TEST_VM_ARM64=$(TEST_VM_ARM64))"; fi

# The eBPF and cgroup ground-truth tests again, inside Debian's 6.1 kernel under qemu (TCG) with
# pure cgroup v2 (docs/VM.md).  A focused selection: Python runs ~19x slower there.
# The OOM kill of a container removed at once, with the agent's default poll, on pure cgroup2
# (memory.max); the rest of tests/test_lifecycle_agent.py does not depend on the kernel's layout.
VM_TESTS   ?= $(wildcard tests/vm/test_vm_guest.py tests/test_bpf_receivers.py tests/test_bpf_memory_v2.py \
                tests/test_bpf_net.py tests/test_bpf_syscall.py tests/test_bpf_layout.py tests/test_bpf_routes.py \
                tests/test_cgroup_receivers_real.py tests/test_resolution_cgroups.py tests/test_lifecycle_kernel.py \
                tests/test_cgroup_follow.py) \
              tests/test_lifecycle_agent.py::test_oom_kill_of_a_container_removed_at_once_counts_one_with_the_default_poll
VM_TIMEOUT ?= 1500

# Idempotent: qemu, busybox and kmod from apt, the 6.1 kernel extracted into build/vm, the initramfs.
vm-setup:
	python3 tests/vm/vm.py prepare

# Fails if the guest's pytest failed, or the VM did not boot or timed out (the one-line error
# names the console log).
VM_FORCED = --env KPOD_VM_FORCED_ROUTES=$(FORCED_ROUTES) --env "KPOD_VM_FORCED_TESTS=$(FORCED_TESTS)"

test-vm: setup vm-setup
	python3 tests/vm/vm.py run --timeout $(VM_TIMEOUT) $(VM_FORCED) -- sh tests/vm/run_tests.sh $(VM_TESTS)

# The same kernel for arm64 under qemu-system-aarch64 (TCG), with an arm64 userland from
# Debian's arm64 packages, arm64 wheels and the arm64 objects (docs/VM.md, "arm64").
VM_ARM64_TESTS   ?= $(VM_TESTS)
VM_ARM64_TIMEOUT ?= 2400

vm-setup-arm64:
	python3 tests/vm/vm.py prepare --arch arm64

test-vm-arm64: setup vm-setup-arm64
	$(MAKE) --no-print-directory bpf-arm64 ARM64_BTF=$(VM_ARM64)/vmlinux.btf
	python3 tests/vm/vm.py run --arch arm64 --timeout $(VM_ARM64_TIMEOUT) $(VM_FORCED) -- \
	  sh tests/vm/run_tests.sh $(VM_ARM64_TESTS)

# Writes docs/perf/<section>.md (figures only, with the run's id, commit, machine and command),
# their raw figures in docs/perf/data/, and docs/PERFORMANCE.md; interpretation is hand-written
# in docs/perf/readings/.  `python -m bench --assemble` / `--render` rebuild without measuring.
# KPOD_BENCH_BASELINE=<worktree of an older commit>: bench.scale and bench.cycle measure it beside
# this tree in the same run (before and after).
bench: setup
	$(PY) -m bench

# Long fuzz runs: hypothesis with many more examples, then coverage-guided atheris per target
# (installed on demand into the venv; FUZZ_SECONDS bounds each atheris target).  About 15 minutes.
FUZZ_EXAMPLES ?= 2000
FUZZ_SECONDS  ?= 60
fuzz: setup
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PYTEST) -q -p no:cacheprovider tests/test_fuzz.py
	@$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install -q atheris
	@set -o pipefail; for target in parsers mountinfo podlist watch config; do \
	  echo "atheris: $$target ($(FUZZ_SECONDS)s)"; \
	  $(PY) tests/fuzz_atheris.py $$target -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 2>&1 | tail -3 || exit 1; \
	done

# Churn soak (500 pod create/delete cycles, <= 5 minutes) and the 2-minute API server outage;
# figures go to docs/perf/soak.md (and its kept figures to docs/perf/data/soak.json), then into
# docs/PERFORMANCE.md.
soak: setup
	SOAK_CYCLES=500 API_OUTAGE_S=120 $(PYTEST) -q -s -p no:cacheprovider tests/test_soak.py tests/test_faults.py -k "soak or outage"
	$(PY) -m bench --assemble

lint: venv
	$(VENV)/bin/ruff check .

fmt: venv
	$(VENV)/bin/ruff format .

# The wheel ships the compiled BPF objects as package data of kpod.bpf (the image installs only
# this).  WHEEL_FLAGS=--no-build-isolation builds offline (needs setuptools>=77 installed).
DIST ?= dist
WHEEL_FLAGS ?=
wheel: bpf
	$(PY) -m pip wheel -q --no-deps $(WHEEL_FLAGS) --wheel-dir $(DIST) .
	$(PY) scripts/check_wheel.py $(DIST)

# ------------------------------------------------------------------------------ the image
# `make image` builds deploy/Dockerfile into the machine's local image storage with podman (no
# registry needed).  The base image is made here from Debian's packages unless PYTHON_IMAGE names
# another one (e.g. PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm, pulled if missing).
# deploy/podman/containers.conf: runc (crun refuses hybrid cgroups), the cgroupfs manager (no
# systemd needed), the machine's own rlimits (no CAP_SYS_RESOURCE needed).
IMAGE        ?= localhost/kpod-metrics:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
BASE_IMAGE   ?= localhost/kpod-python-base:3.11-bookworm
PYTHON_IMAGE ?= $(BASE_IMAGE)
PODMAN       ?= podman
export CONTAINERS_CONF ?= $(CURDIR)/deploy/podman/containers.conf
DEBIAN_MIRROR ?= http://deb.debian.org/debian
# e.g. --layers=false: no cached intermediate images (the tests build so)
IMAGE_BUILD_FLAGS ?=
# The RUN steps' cgroup parent: podman's default (/libpod_parent, with a conmon child) would stay
# behind in every hierarchy; this one is removed when the build ends.
IMAGE_BUILD_CGROUP ?= /kpod-metrics-build

container-packages:
	@$(MAKE) --no-print-directory system-packages APT_PACKAGES="$(CONTAINER_PACKAGES)"

image: container-packages $(if $(filter $(BASE_IMAGE),$(PYTHON_IMAGE)),base-image)
	$(PODMAN) build --network host --pull=$(if $(filter $(BASE_IMAGE),$(PYTHON_IMAGE)),never,missing) \
	  --cgroup-parent=$(IMAGE_BUILD_CGROUP) $(IMAGE_BUILD_FLAGS) -f deploy/Dockerfile \
	  --build-arg PYTHON_IMAGE=$(PYTHON_IMAGE) -t $(IMAGE) .
	@$(PODMAN) image inspect --format '$(IMAGE): {{.Size}} bytes' $(IMAGE)

# A Python 3.11 base made from Debian's packages (deploy/podman/base-image.sh); made once, reused.
base-image: container-packages
	@if $(PODMAN) image exists $(BASE_IMAGE); then echo "$(BASE_IMAGE): exists (podman rmi it to remake)"; \
	else PODMAN="$(PODMAN)" deploy/podman/base-image.sh $(BASE_IMAGE) $(DEBIAN_MIRROR); fi

# deploy/manifests/ is rendered from the Helm chart, deploy/grafana/ from scripts/gen_dashboard.py
# and the chart's seccomp profile from the runtime default (scripts/gen_seccomp_profile.py);
# never edited by hand; tests compare.
manifests: venv
	$(PY) scripts/render_manifests.py
	$(PY) scripts/gen_dashboard.py
	$(PY) scripts/gen_seccomp_profile.py

# docs/METRICS.md and docs/CONFIGURATION.md are generated from the code; a test compares.
docs: venv bpf
	$(PY) scripts/gen_docs.py

clean:
	rm -f bpf/*.bpf.o bpf/vmlinux.h
	rm -rf build dist *.egg-info
