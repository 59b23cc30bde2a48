// syscall_hub.bpf.h: what the syscall hub (bpf/syscall_hub.bpf.c, loaded by probes/syscall_hub.py) hands each
// syscall-based probe's part: one completed system call, read once from the task's saved registers.
//
// Why sys_exit alone is enough on x86_64: the syscall entry saves the user registers in struct pt_regs and every
// syscall handler reads its arguments from there without writing them back (only ax gets the return value), so
// at sys_exit di/si/dx still hold the first three arguments as the task passed them, orig_ax the syscall number,
// and a read's user buffer is filled. (A ptrace tracer may rewrite them; the classic tracepoints see its
// rewrites at entry, we see them at exit.)
#ifndef OTEL_EBPF_SYSCALL_HUB_BPF_H
#define OTEL_EBPF_SYSCALL_HUB_BPF_H
#ifdef SYSCALL_HUB

#include <asm/unistd.h>  // __NR_* of this arch, from the kernel's own headers

// x86_64 struct pt_regs from dx through cs (the hub checks the offsets against the kernel headers at compile time),
// then the return value.
struct syscall_exit {
    u64 dx;      // third argument
    u64 si;      // second
    u64 di;      // first
    s64 nr;      // orig_ax: the syscall number (-1 when none)
    u64 ip;
    u64 cs;      // the code segment the call came from: __USER32_CS for a 32-bit (ia32) task
    s64 ret;
};

// A 32-bit task's syscall numbers are another table (its read is x86_64's close): the classic per-syscall
// tracepoints ignore those calls, and so do the parts that interpret arguments. Told by the code segment, which
// misses one rare case: a 64-bit task calling `int $0x80` (the kernel's TS_COMPAT flag would tell, but it sits in
// task_struct, whose layout the generic headers bcc compiles against do not promise).
#define SYSCALL_HUB_USER32_CS 0x23  // __USER32_CS: GDT_ENTRY_DEFAULT_USER32_CS (4) * 8 + 3, a fixed x86_64 ABI value
static __always_inline int compat_syscall(const struct syscall_exit *call) {
    return call->cs == SYSCALL_HUB_USER32_CS;
}

#endif  // SYSCALL_HUB
#endif  // OTEL_EBPF_SYSCALL_HUB_BPF_H
