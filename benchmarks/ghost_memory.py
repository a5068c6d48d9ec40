"""Time and peak memory of the ghost-clipping step, per implementation variant and per phase.

One JSON line per case. Each case runs in its own subprocess (peak RSS = that process's
``ru_maxrss``, which is a high-water mark). A step is one compiled micro-batch step as in
benchmarks/clipping_methods.py (no noise, no optimizer update), on WRN-16-4 at 32×32 by default.
Each line also has the traced graph's node count and the RSS after tracing, and, where the CPU
allocator counts (oneDNN on), its peak bytes in tensors and the bytes the step still holds
after its calls returned (``allocator_peak_mb``, ``allocator_held_after_step_mb``).

Variants (``--variants``; module settings of tfdpfair.privacy.ghost_linear, restored per
process):
  nonprivate        the gradient of the summed loss (TF's native kernel gradients);
  ghost             the library's defaults;
  keep_per_example  direct-mode weighted sums from the kept per-example gradients and the
                    ghost-mode ones from im2col patches (the behaviour before this benchmark:
                    ghost_linear.NATIVE_WEIGHTED_SUM = False);
  keep_none, keep_all  ghost_linear.KEEP_PER_EXAMPLE_BYTES = 0 / unbounded (default 128 MB):
                    which direct-mode layers keep their per-example gradients for the sum;
  native_any_t      ghost_linear.NATIVE_MIN_POSITIONS = 0 (default 512): the native
                    per-example kernel gradient for every direct conv, whatever its T;
  keep_all_native_any_t  both of the above;
  chunk4, chunk64   ghost_linear.CHUNK_BYTES = 4 MB / 64 MB (default 16 MB);
  native3           ghost_linear.NATIVE_CHUNK_BYTES = 3 MB (default 12 MB; only where the
                    native per-example kernel gradient runs, see native_grouped_backprop).
Phases (``--phases``; ghost defaults only): the step cut after
  capture  the forward pass and the backward pass to the recorded layer outputs;
  small    + the per-example gradients of the small variables (biases, gains, norm affines);
  norms    + every per-example norm (the clip factors);
  full     + the clipped sums (the whole step).

``--memray FILE`` records the timed calls of each case with memray (native stacks) into
FILE.<case>.bin and adds to its JSON line the bytes live at the high-water mark, by the
TensorFlow kernel that allocated them (needs ``make bench-install``: setup.py's ``bench``
extra). Accelerators: ``--device /GPU:0`` places the step, ``--jit_compile`` compiles it with
XLA, ``--policy mixed_bfloat16`` computes in bf16.

  python benchmarks/ghost_memory.py                      # all variants, WRN-16-4 B = 128
  python benchmarks/ghost_memory.py --variants ghost --phases capture small norms full
"""

from __future__ import annotations

import tfdpfair.tf_cpu

tfdpfair.tf_cpu.prefer_onednn()  # before TensorFlow: docs/benchmarks.md, "oneDNN"

import argparse
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {  # name -> ghost_linear settings
    "nonprivate": {},
    "ghost": {},
    "keep_per_example": {"NATIVE_WEIGHTED_SUM": False},
    "chunk4": {"CHUNK_BYTES": 4 << 20},
    "chunk64": {"CHUNK_BYTES": 64 << 20},
    "native3": {"NATIVE_CHUNK_BYTES": 3 << 20},
    "keep_none": {"KEEP_PER_EXAMPLE_BYTES": 0},
    "keep_all": {"KEEP_PER_EXAMPLE_BYTES": 1 << 40},
    "native_any_t": {"NATIVE_MIN_POSITIONS": 0},
    "keep_all_native_any_t": {"KEEP_PER_EXAMPLE_BYTES": 1 << 40, "NATIVE_MIN_POSITIONS": 0},
}
DEFAULT_VARIANTS = ["nonprivate", "ghost", "keep_per_example", "chunk4", "chunk64"]
PHASES = ("capture", "small", "norms", "full")
MODELS = {  # name -> (kind, variant, input shape)
    "wrn_16_4": ("wrn", (16, 4), (32, 32, 3)),
    "nfnet_f0_224": ("nfnet", "F0", (224, 224, 3)),
    "nfnet_micro": ("nfnet", "micro", (32, 32, 3)),
}


def machine_info() -> dict:
    """CPU model, cores and the 1-minute load average (in every JSON line)."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "nproc": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
            "onednn": tfdpfair.tf_cpu.onednn_setting()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def allocator_mb() -> dict:
    """TensorFlow's CPU allocator counters in MB: bytes in tensors now and their peak since the
    process started. oneDNN's CPU allocator counts them; TF's plain one does not (then {})."""
    import tensorflow as tf

    try:
        info = tf.config.experimental.get_memory_info("CPU:0")
    except ValueError:
        return {}
    return {"in_use": round(info["current"] / 2**20, 1), "peak": round(info["peak"] / 2**20, 1)}


def build(model_name: str, batch: int, policy: str):
    """(model, x, y) with random inputs and labels, seed 0."""
    import keras
    import numpy as np
    import tensorflow as tf

    keras.mixed_precision.set_global_policy(policy)
    from tfdpfair.models.nfnet import build_nfnet
    from tfdpfair.models.wide_resnet import build_wide_resnet

    kind, variant, shape = MODELS[model_name]
    keras.utils.set_random_seed(0)
    if kind == "nfnet":
        model = build_nfnet(variant, 10, shape, drop_rate=0.0, stochdepth_rate=0.0)
    else:
        model = build_wide_resnet(variant, 10, shape)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch,) + shape).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, batch).astype(np.int32))
    return model, x, y


def phase_step(model, x, y, phase: str):
    """The ghost step cut after ``phase``: returns tensors that depend on all of its work."""
    import keras
    import tensorflow as tf

    from tfdpfair.privacy import ghost_clipping as gc
    from tfdpfair.privacy import ghost_rules

    fn = gc.batch_example_loss_fn(model, keras.losses.SparseCategoricalCrossentropy(True))
    variables = model.trainable_variables
    if phase == "full":
        return lambda: gc.ghost_clipped_grad_sum(model, fn, variables, (x, y),
                                                 tf.ones([x.shape[0]]), 1.0,
                                                 has_aux=True).grad_sum
    batch = int(x.shape[0])

    def step():
        rules, layers, _ = gc.plan_rules(model, variables)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            capture = gc._Capture(tape, rules)
            gc._install(layers)
            gc._ACTIVE.capture = capture
            try:
                losses = fn((x, y))[0]
            finally:
                gc._ACTIVE.capture = None
                gc._uninstall(layers)
            total = tf.reduce_sum(losses)
        records = [r for recs in capture.records.values() for r in recs]
        deltas = tape.gradient(total, [r["z"] for r in records])
        if phase == "capture":  # every ∂L/∂z and every recorded input must exist
            return [tf.reduce_sum(d) for d in deltas] + [
                tf.reduce_sum(tf.cast(r.get("x", r.get("xhat", r.get("r", 0.0))), tf.float32))
                for r in records]
        for r, d in zip(records, deltas):
            r["dz"] = d
        wanted = {id(v) for v in variables}
        pieces = []
        for layer in layers:
            pieces += rules[id(layer)].pieces(layer, capture.records[id(layer)], batch, wanted,
                                              "auto")
        out, after = [], []
        for p in reversed(pieces):
            if isinstance(p, ghost_rules.KernelPiece):
                if phase == "norms":
                    large = p.piece.is_large()
                    out.append(p.piece.sq_norms(after=after if large else ()))
                    after = out[-1:] if large else after
                else:  # keep the kernels' inputs alive without their norms
                    out.append(tf.reduce_sum(p.piece.D))
            else:
                out.append(tf.reduce_sum(tf.square(p.grads)))
        return out

    return step


def nonprivate_step(model, x, y):
    import keras
    import tensorflow as tf

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    variables = model.trainable_variables

    def step():
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        return tape.gradient(value, variables)

    return step


def kernel_of(frames: list[str]) -> str:
    """The TensorFlow op kernel in a native stack: the first ``…::Compute`` frame other than
    the device's dispatcher, shortened to its class name (e.g. ``BinaryOp<…mul<float>>``)."""
    for frame in frames:
        if "::Compute(" in frame and "Device::Compute" not in frame:
            name = frame.split("::Compute(")[0].replace("tensorflow::", "")
            name = name.replace("Eigen::ThreadPoolDevice, ", "").replace("functor::", "")
            return name[:80]
    return "other (runtime, Python)"


def memray_peak_by_kernel(path: str, top: int = 20) -> dict:
    """MB live at memray's heap high-water mark by allocating kernel, and the process RSS
    against the tracked heap over the recording (RSS − heap = allocator-held memory plus what
    was live before tracking started)."""
    from memray import FileReader

    reader = FileReader(path)
    by_kernel = collections.Counter()
    for record in reader.get_high_watermark_allocation_records(merge_threads=True):
        frames = [f[0] for f in record.native_stack_trace(max_stacks=16)]
        by_kernel[kernel_of(frames)] += record.size
    snaps = list(reader.get_memory_snapshots())
    at_rss = max(snaps, key=lambda s: s.rss)
    return {"memray_heap_peak_mb": round(reader.metadata.peak_memory / 2**20, 1),
            "memray_rss_at_start_mb": round(snaps[0].rss / 2**20, 1),
            "memray_rss_peak_mb": round(at_rss.rss / 2**20, 1),
            "memray_heap_at_rss_peak_mb": round(at_rss.heap / 2**20, 1),
            "memray_heap_peak_by_kernel_mb": {k: round(v / 2**20, 1)
                                              for k, v in by_kernel.most_common(top)}}


def run_case(args) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    from step_timer import current_rss_mb  # imports Keras: only in the child, after oneDNN is set

    from tfdpfair.privacy import ghost_linear as gl

    variant, phase = args.case
    for name, value in VARIANTS[variant].items():
        setattr(gl, name, value)
    model, x, y = build(args.model, args.batch, args.policy)
    with tf.device(args.device):
        step = (nonprivate_step(model, x, y) if variant == "nonprivate"
                else phase_step(model, x, y, phase))
        step = tf.function(step, jit_compile=args.jit_compile)

        def call():
            tf.nest.map_structure(lambda t: t.numpy(), step())

        rss_before = peak_rss_mb()
        in_use_before = allocator_mb().get("in_use")
        start = time.perf_counter()
        graph_nodes = len(step.get_concrete_function().graph.as_graph_def().node)
        trace_s, rss_after_trace = time.perf_counter() - start, current_rss_mb()
        call()
        first = time.perf_counter() - start
        call()
        tracker = None
        if args.memray:
            import memray

            path = f"{args.memray}.{variant}.{phase}.bin"
            if os.path.exists(path):
                os.remove(path)
            tracker = memray.Tracker(path, native_traces=True)
            tracker.__enter__()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        if tracker is not None:
            tracker.__exit__(None, None, None)
        allocator = allocator_mb()
    line = {"benchmark": "ghost_memory", "model": args.model, "batch": args.batch,
            "variant": variant, "phase": phase, "step_s": round(statistics.median(times), 4),
            "trace_and_first_s": round(first, 2), "trace_s": round(trace_s, 2),
            "graph_nodes": graph_nodes, "peak_rss_mb": round(peak_rss_mb(), 1),
            "rss_before_step_mb": round(rss_before, 1),
            "rss_after_trace_mb": round(rss_after_trace, 1),
            # Tensors: the allocator's peak, and what the step still holds after its calls
            # returned and their outputs were dropped (folded constants, caches).
            "allocator_peak_mb": allocator.get("peak"),
            "allocator_held_after_step_mb": (round(allocator["in_use"] - in_use_before, 1)
                                             if allocator else None),
            "policy": args.policy,
            "device": args.device, "jit_compile": args.jit_compile,
            "chunk_bytes": gl.CHUNK_BYTES, "native_chunk_bytes": gl.NATIVE_CHUNK_BYTES,
            "native_weighted_sum": getattr(gl, "NATIVE_WEIGHTED_SUM", False),
            "native_grouped_backprop": gl.native_grouped_backprop_supported(), **machine_info()}
    if args.memray:
        line.update(memray_peak_by_kernel(path))
    return line


def add_accelerator_flags(parser: argparse.ArgumentParser) -> None:
    """--policy, --device and --jit_compile, as this script and benchmarks/nfnet_f0.py take them."""
    parser.add_argument("--policy", default="float32", choices=["float32", "mixed_bfloat16"])
    parser.add_argument("--device", default="/CPU:0", help="e.g. /GPU:0")
    parser.add_argument("--jit_compile", action="store_true", help="compile the step with XLA")


def accelerator_flags(args: argparse.Namespace) -> list[str]:
    """Those flags again, for a child process's command line."""
    return (["--policy", args.policy, "--device", args.device]
            + (["--jit_compile"] if args.jit_compile else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wrn_16_4", choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        choices=list(VARIANTS))
    parser.add_argument("--phases", nargs="+", default=["full"], choices=PHASES,
                        help="cut the ghost step after these phases (variant 'ghost' only)")
    parser.add_argument("--repeats", type=int, default=3)
    add_accelerator_flags(parser)
    parser.add_argument("--memray", default="", help="record with memray into FILE.<case>.bin")
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # variant phase (child)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args)), flush=True)
        return
    cases = [(v, "full") for v in args.variants if v != "ghost" or args.phases == ["full"]]
    if "ghost" in args.variants and args.phases != ["full"]:
        cases += [("ghost", p) for p in args.phases]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE) + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    base = None
    for variant, phase in cases:
        command = [sys.executable, __file__, "--case", variant, phase, "--model", args.model,
                   "--batch", str(args.batch), "--repeats", str(args.repeats), "--memray",
                   args.memray] + accelerator_flags(args)
        print(f"[ghost_memory] {args.model} B={args.batch} {variant} {phase} ...",
              file=sys.stderr, flush=True)
        out = subprocess.run(command, capture_output=True, text=True, env=env)
        if out.returncode:
            line = {"benchmark": "ghost_memory", "variant": variant, "phase": phase,
                    "error": out.stderr.strip().splitlines()[-3:],
                    "returncode": out.returncode, **machine_info()}
        else:
            line = json.loads(out.stdout.strip().splitlines()[-1])
            if variant == "nonprivate":
                base = line
            elif base is not None:
                line["time_vs_nonprivate"] = round(line["step_s"] / base["step_s"], 2)
                line["rss_vs_nonprivate"] = round(line["peak_rss_mb"] / base["peak_rss_mb"], 2)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
