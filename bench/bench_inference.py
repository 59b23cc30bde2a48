#!/usr/bin/env python3
"""Scoring one window: onnxruntime (StateModel.predict, what the agent runs every interval) against the
scikit-learn pipeline it was exported from, in the same process, on the same windows.

Both sides start from the window's feature dict, so both pay for building the vector:
  onnxruntime   StateModel.predict(values)  → cluster, state, score, distance, top-3 features
  scikit-learn  pipeline.predict(x) + pipeline.transform(x)   (gmm: predict + predict_proba; it has no transform)

Median of --repeat timed calls after a warm-up, cycling through distinct training windows.

examples:
  .venv/bin/python bench/bench_inference.py
  .venv/bin/python bench/bench_inference.py --algorithms kmeans --features 16 --repeat 5000 --check
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model_export import train as tr  # noqa: E402
from model_export.synthetic import DEMO_FEATURES, DEMO_STATES, make_windows  # noqa: E402
from otel_ebpf_receiver.model import load_model  # noqa: E402

TARGET_SPEEDUP = 10.0


def timed(fn, inputs: list, repeat: int, warmup: int = 200) -> np.ndarray:  # type: ignore[no-untyped-def]
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    out = np.empty(repeat, dtype=np.float64)
    clock = time.perf_counter_ns
    for i in range(repeat):
        arg = inputs[i % len(inputs)]
        t0 = clock()
        fn(arg)
        out[i] = clock() - t0
    return out / 1000.0  # µs


def feature_names(n: int) -> tuple[str, ...]:
    extra = tuple(f"synthetic.feature_{i}" for i in range(max(0, n - len(DEMO_FEATURES))))
    return (DEMO_FEATURES + extra)[:n]


def bench(algorithm: str, names: tuple[str, ...], repeat: int, workdir: Path) -> list[tuple]:
    table = make_windows(names, DEMO_STATES, per_state=300, seed=0)
    trained = tr.fit(table, tr.TrainConfig(algorithm=algorithm))
    model = load_model(tr.export(trained, workdir / f"{algorithm}.onnx").path, list(names))
    pipe = trained.pipeline
    windows = [dict(zip(names, row.tolist())) for row in trained.X[:: max(1, len(trained.X) // 256)]]

    def sk(values):  # type: ignore[no-untyped-def]
        x = np.array([[values.get(n, 0.0) for n in names]], dtype=np.float64)
        second = pipe.predict_proba(x) if algorithm == "gmm" else pipe.transform(x)
        return pipe.predict(x), second

    # the two agree on these windows (parity is checked at export; this guards the benchmark itself)
    assert all(model.predict(v).cluster == int(sk(v)[0][0]) for v in windows[:50])
    ort_us = timed(model.predict, windows, repeat)
    sk_us = timed(sk, windows, max(200, repeat // 5))
    x = model.vector(windows[0])
    raw_us = timed(lambda _v: model.run(x), windows, repeat)
    sk_call = "predict + predict_proba" if algorithm == "gmm" else "predict + transform"
    med_ort, med_sk = float(np.median(ort_us)), float(np.median(sk_us))
    return [
        (algorithm, "onnxruntime StateModel.predict", med_ort, float(np.percentile(ort_us, 90)), med_sk / med_ort),
        (algorithm, "onnxruntime session.run only", float(np.median(raw_us)), float(np.percentile(raw_us, 90)),
         med_sk / float(np.median(raw_us))),
        (algorithm, f"scikit-learn {sk_call}", med_sk, float(np.percentile(sk_us, 90)), 1.0),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", default="kmeans,gmm,birch", help="comma-separated (default: all three)")
    parser.add_argument("--features", type=int, default=len(DEMO_FEATURES), help="feature vector width")
    parser.add_argument("--repeat", type=int, default=5000, help="timed calls per path (scikit-learn: 1/5)")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 unless onnxruntime is >= {TARGET_SPEEDUP:g}x faster")
    args = parser.parse_args(argv)

    names = feature_names(args.features)
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory() as tmp:
        for algorithm in args.algorithms.split(","):
            rows += bench(algorithm.strip(), names, args.repeat, Path(tmp))

    import onnxruntime
    import sklearn

    print(f"### Scoring one window ({len(names)} features, 4 clusters) — {platform.machine()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
          f"scikit-learn {sklearn.__version__}\n")
    print("| algorithm | path | median µs/window | p90 µs | speed-up vs scikit-learn |")
    print("|---|---|---:|---:|---:|")
    for algorithm, path, med, p90, ratio in rows:
        print(f"| {algorithm} | {path} | {med:.1f} | {p90:.1f} | {ratio:.1f}× |")
    worst = min(r[4] for r in rows if r[1] == "onnxruntime StateModel.predict")
    verdict = "met" if worst >= TARGET_SPEEDUP else "NOT met"
    print(f"\ntarget: StateModel.predict >= {TARGET_SPEEDUP:g}× faster than scikit-learn — {verdict} "
          f"(worst {worst:.1f}×)")
    return 1 if args.check and worst < TARGET_SPEEDUP else 0


if __name__ == "__main__":
    sys.exit(main())
