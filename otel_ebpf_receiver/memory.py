"""Give back the memory that loading the probes and the model left behind, once the agent is built.

Measured with every default probe (bench/bench_memory.py prints the same breakdown): of ~265 MB resident after
``build_agent``, ~160 MB serve only the loading and nothing after it:

* **code pages of libLLVM and libclang-cpp** (~75 MB): bcc compiles each probe with them inside the agent's
  process. They are clean pages of the library files: the kernel can drop them and fault them back from the file
  if a later compile needs them. The same holds for onnx's C++ checker (~5 MB), when a model file from the model
  directory was validated at start (bundled models load without onnx: model/runtime.py);
* **bcc's kernel symbol cache** (~20 MB of heap): ``BPF.support_raw_tracepoint`` looks up two kernel symbols,
  and bcc answers by reading all of /proc/kallsyms into a cache it keeps for the life of the process;
* **the malloc heap the compiler grew and freed** (~35 MB): glibc keeps freed memory for reuse until
  ``malloc_trim`` hands whole free pages back (or, later and partly, until a ``free`` shrinks the heap's top).

:func:`release_after_load` frees all three, once, in a few tens of milliseconds. Only what is safe to drop is
touched: file-backed mappings that are not writable and hold no private copy of a page (``Anonymous: 0`` in
smaps), so a dropped page reads back exactly as it was; relocated data (RELRO) and every anonymous mapping stay.
``MADV_PAGEOUT`` (Linux ≥ 5.4) also frees the page-cache copy, which a container's memory limit is charged for,
when no other process maps the page; pages that others share are then unmapped from this process with
``MADV_DONTNEED``, which is also the whole fallback on an older kernel. Nothing here raises: a system without
glibc or madvise keeps its memory and says so in one debug line.

What stays and why (same bench): onnxruntime's code (~27 MB; scoring one window faults most of it back, the
kernel maps whole page-cache folios), gRPC's (~15 MB with the OTLP/gRPC exporter, used every export), the
LLVM/clang data segments relocated at load (~10 MB, private copies), bcc's compiled modules (~1 MB per probe,
owned by bcc's ``BPF`` objects, which Python's bcc cannot free without closing the maps), Python and numpy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import sys
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

log = logging.getLogger("otel_ebpf_receiver")

# Libraries that only loading executes, matched on the start of the file name (libLLVM-14.so.1,
# libclang-cpp.so.14, onnx_cpp2py_export.cpython-311-x86_64-linux-gnu.so). bcc's map access and attach code lives
# in libbcc and libbpf, which are not here: they run every window.
LOADING_LIBRARIES = ("libLLVM", "libclang", "onnx_cpp2py_export")

MADV_DONTNEED = 4
MADV_PAGEOUT = 21  # Linux 5.4; older kernels answer EINVAL
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \d+\s*(.*)$")


@dataclass
class Mapping:
    """One mapping of /proc/<pid>/smaps with the fields used here (sizes in KiB)."""

    start: int
    end: int
    perms: str
    path: str
    rss: int = 0
    anonymous: int = 0

    @property
    def name(self) -> str:
        """The file name without its version (libLLVM-14.so.1 -> libLLVM-14.so), or [heap], [stack], [anon]."""
        if not self.path:
            return "[anon]"
        if not self.path.startswith("/"):
            return self.path
        return re.sub(r"\.so(\.[\d.]+)?( \(deleted\))?$", ".so", os.path.basename(self.path))

    @property
    def droppable(self) -> bool:
        """Clean file pages only: the file holds exactly what is mapped, so a dropped page faults back unchanged."""
        return self.path.startswith("/") and "w" not in self.perms and self.anonymous == 0 and self.rss > 0

    def is_one_of(self, prefixes: tuple[str, ...]) -> bool:
        return os.path.basename(self.path).startswith(prefixes)


def mappings(pid: int | str = "self") -> list[Mapping]:
    out: list[Mapping] = []
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            match = _MAPPING.match(line)
            if match:
                out.append(Mapping(int(match[1], 16), int(match[2], 16), match[3], match[4].strip()))
            elif line.startswith("Rss:"):
                out[-1].rss = int(line.split()[1])
            elif line.startswith("Anonymous:"):
                out[-1].anonymous = int(line.split()[1])
    return out


def resident(pid: int | str = "self") -> Counter:
    """Resident KiB per mapping name: [heap], [anon], [stack] and one entry per library file."""
    total: Counter = Counter()
    for m in mappings(pid):
        total[m.name] += m.rss
    return total


def droppable_resident(prefixes: Iterable[str] = LOADING_LIBRARIES, pid: int | str = "self") -> int:
    """Resident KiB of the clean file pages of the libraries named by ``prefixes``: what
    :func:`drop_library_pages` can give back."""
    prefixes = tuple(prefixes)
    return sum(m.rss for m in mappings(pid) if m.droppable and m.is_one_of(prefixes))


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def trim_heap() -> bool:
    """glibc's malloc_trim(0): return every whole free page of every malloc arena to the kernel. False where the
    C library has none (musl)."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def _advise(libc: ctypes.CDLL, ranges: Iterable[Mapping], advice: int) -> int:
    """madvise each range; 0 when all succeeded, else the first errno."""
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for m in ranges:
        if libc.madvise(m.start, m.end - m.start, advice) != 0:
            return ctypes.get_errno()
    return 0


def drop_library_pages(prefixes: Iterable[str] = LOADING_LIBRARIES) -> str:
    """Drop the clean resident pages of the libraries named by ``prefixes``. Returns how: "pageout+dontneed",
    "dontneed" (kernel without MADV_PAGEOUT), or why nothing was dropped."""
    libc = _libc()
    if libc is None or not hasattr(libc, "madvise"):
        return "no madvise in the C library"
    prefixes = tuple(prefixes)

    def targets() -> list[Mapping]:
        return [m for m in mappings() if m.droppable and m.is_one_of(prefixes)]

    how = "pageout+dontneed"
    err = _advise(libc, targets(), MADV_PAGEOUT)
    if err == errno.EINVAL:
        how = "dontneed"
        log.debug("memory: no MADV_PAGEOUT on this kernel (Linux < 5.4): unmapping loading-only pages with "
                  "MADV_DONTNEED; their page cache stays until the kernel reclaims it")
    elif err:
        return f"madvise failed: {os.strerror(err)}"
    # PAGEOUT leaves alone the pages another process maps too (another bcc tool): unmap those from this process.
    err = _advise(libc, targets(), MADV_DONTNEED)
    return how if not err else f"madvise failed: {os.strerror(err)}"


def free_symbol_caches() -> int:
    """Free bcc's symbol caches (``BPF._sym_caches``, filled by ``BPF.ksymname`` and ``BPF.sym``); returns how
    many. The next look-up builds a cache again. A cache that anything besides bcc's dict still references is
    kept: freeing it under a holder would leave that holder a dangling pointer."""
    bcc = sys.modules.get("bcc")
    caches = getattr(getattr(bcc, "BPF", None), "_sym_caches", None)
    free = getattr(getattr(bcc, "lib", None), "bcc_free_symcache", None)
    if not isinstance(caches, dict) or free is None:
        return 0
    freed = 0
    for pid in list(caches):
        cache = caches.pop(pid)
        pointer, still_held = getattr(cache, "cache", None), weakref.ref(cache)
        del cache  # bcc's dict held the last reference unless someone else keeps the cache object
        held = still_held()
        if held is not None:
            caches[pid] = held
        elif pointer:
            free(pointer, pid)
            freed += 1
    return freed


@dataclass
class Released:
    """What :func:`release_after_load` gave back: resident KiB before minus after."""

    total_kib: int
    libraries_kib: int
    heap_kib: int
    how: str


def release_after_load() -> Released | None:
    """Once every program is compiled and the model loaded: free bcc's symbol caches, trim the malloc heap and
    drop the loading-only libraries' code pages (see the module docstring). None, with one debug line, where
    /proc/self/smaps cannot be read (no page is dropped blind)."""
    try:
        before = resident()
        caches = free_symbol_caches()
        trimmed = trim_heap()
        how = drop_library_pages()
        after = resident()
    except OSError as exc:
        log.debug("memory: not all released after loading: cannot read /proc/self/smaps (%s)", exc)
        return None
    libraries = sum(before[n] - after[n] for n in before if n.startswith(LOADING_LIBRARIES))
    released = Released(sum(before.values()) - sum(after.values()), libraries, before["[heap]"] - after["[heap]"],
                        how if trimmed else f"{how}; no malloc_trim in this C library")
    log.debug("memory: released %d KiB after loading (%d KiB of loading-only library pages, %s; %d KiB of heap; "
              "%d bcc symbol cache(s))", released.total_kib, libraries, released.how, released.heap_kib, caches)
    return released


__all__ = ["LOADING_LIBRARIES", "Mapping", "Released", "drop_library_pages", "droppable_resident",
           "free_symbol_caches", "mappings", "release_after_load", "resident", "trim_heap"]
