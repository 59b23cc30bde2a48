"""The scenario lab (``otel-ebpf-lab``): namespace hosts, bounded loads and host workloads driven against the
agent's probes, to record labelled training windows, score the running agent, and rebuild the bundled models.

The third wing of the project: it imports training (``model_export``) and the runtime (``otel_ebpf_receiver``);
neither imports it. Its modules are listed in :mod:`model_export.lab.cli`.
"""
