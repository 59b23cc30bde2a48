// syscall_hub: one raw sys_exit program for every syscall-based probe (syscalls, file_open, http).
//
// Any classic syscalls:* tracepoint makes the kernel run its perf syscall handlers on every system call of every
// process, in both directions; one program per probe makes each call pay once per probe. Here a call pays one
// program run: the registers are read once, then each enabled probe's part (its on_syscall_exit handler, pasted
// above this file by probes/syscall_hub.py, in SYSCALL_HUB_HANDLERS order) switches on the syscall number and
// returns at once for the numbers it does not watch: a few compares, no map lookup. Where the kernel allows it the
// program is BTF-typed and reads the registers with plain loads (SYSCALL_HUB_BTF).
#include <uapi/linux/ptrace.h>
#include <linux/stddef.h>

#include "syscall_hub.bpf.h"

#ifndef SYSCALL_HUB_HANDLERS
#error "SYSCALL_HUB_HANDLERS: the loader names the enabled parts' handlers"
#endif

// Detect, don't assume: the one-copy read below relies on the x86_64 frame layout.
_Static_assert(offsetof(struct pt_regs, si) - offsetof(struct pt_regs, dx) == offsetof(struct syscall_exit, si) &&
               offsetof(struct pt_regs, di) - offsetof(struct pt_regs, dx) == offsetof(struct syscall_exit, di) &&
               offsetof(struct pt_regs, orig_ax) - offsetof(struct pt_regs, dx) == offsetof(struct syscall_exit, nr) &&
               offsetof(struct pt_regs, cs) - offsetof(struct pt_regs, dx) == offsetof(struct syscall_exit, cs),
               "struct pt_regs is not the x86_64 frame the syscall hub reads");

#ifdef SYSCALL_HUB_BTF
// raw_syscalls:sys_exit(struct pt_regs *regs, long ret), loaded BTF-typed ("tp_btf", probes/syscall_hub.py): the
// verifier knows ctx[0] is the kernel's struct pt_regs, so each register is one plain load, not a
// bpf_probe_read_kernel call (~10-35 ns, more than everything else a call pays here). Not named with a bcc
// prefix: bcc must not attach it itself, the loader does.
int syscall_hub_sys_exit(u64 *ctx) {
    const struct pt_regs *regs = (const struct pt_regs *)ctx[0];
    struct syscall_exit call = {};
    call.nr = regs->orig_ax;
    if (call.nr < 0)
        return 0;
    call.dx = regs->dx;
    call.si = regs->si;
    call.di = regs->di;
    call.cs = regs->cs;
    call.ret = (s64)ctx[1];
    SYSCALL_HUB_HANDLERS
    return 0;
}
#else
// raw_syscalls:sys_exit(struct pt_regs *regs, long ret), untyped: where the kernel cannot load BTF-typed
// programs, the registers are copied once with the helper.
RAW_TRACEPOINT_PROBE(sys_exit) {
    struct syscall_exit call = {};
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    if (bpf_probe_read_kernel(&call, offsetof(struct syscall_exit, ret), &regs->dx) != 0 || call.nr < 0)
        return 0;
    call.ret = (s64)ctx->args[1];
    SYSCALL_HUB_HANDLERS
    return 0;
}
#endif
