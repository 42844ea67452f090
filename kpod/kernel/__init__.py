"""Kernel access: the libbpf binding, BTF layouts, the eBPF receiver base, syscall tables and
the capability preflight.  Only eBPF receivers (and `kpod-metrics check`) import from here."""
