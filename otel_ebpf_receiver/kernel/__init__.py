"""Thin layers over what the kernel offers user space: the bpf(2) system call for pinned maps (``bpfsys``), fast
reads of bcc maps (``maps``), log2 histogram slots (``log2hist``), tracefs (``tracefs``) and network namespaces
(``netns``). Nothing here knows about probes, models or OpenTelemetry."""
