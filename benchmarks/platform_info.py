"""The machine a benchmark ran on, in one line for a results header.

What changes TensorFlow's CPU speed and memory figures besides the code: the
CPU and its vector extensions (TensorFlow's oneDNN is on by default only on
CPUs with AVX-512 and newer), whether oneDNN is on (`TF_ENABLE_ONEDNN_OPTS`),
and which CPU allocator TensorFlow uses: its default one, which gives large
buffers back to the OS when they are freed, or the BFC allocator, which keeps
them (on with oneDNN, or with `TF_CPU_ALLOCATOR_USE_BFC=true`).

    from benchmarks import platform_info
    print(platform_info.describe())

or `python -m benchmarks.platform_info`.
"""

import os
import platform

# /proc/cpuinfo flags that decide which kernels TensorFlow, oneDNN and XLA use.
RELEVANT_FLAG_PREFIXES = ("avx", "fma", "f16c", "amx")


def cpu_model():
    """The CPU's model name ("AMD EPYC ..."), or what `platform` knows."""
    for key, value in _cpuinfo_fields():
        if key in ("model name", "Model", "cpu model"):
            return value
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags():
    """Sorted flags relevant to TensorFlow (avx2, fma, avx512*, amx*...), or None if unknown."""
    for key, value in _cpuinfo_fields():
        if key in ("flags", "Features"):
            return sorted(f for f in value.split() if f.startswith(RELEVANT_FLAG_PREFIXES))
    return None


def onednn_enabled():
    """True/False as TensorFlow decided at start-up, None if it cannot be told
    (`kerasbn.kernels.tf_internals.onednn_enabled`). Imports TensorFlow: call
    it after setting TensorFlow's environment variables."""
    from kerasbn.kernels import tf_internals

    return tf_internals.onednn_enabled()


def bfc_allocator():
    """Whether TensorFlow's CPU allocator is BFC (the one that keeps statistics)."""
    import tensorflow as tf

    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
    except (ValueError, RuntimeError, tf.errors.OpError):
        return False
    return True


def allocator_description():
    """'BFC (...)' or 'default (...)', with what chose it."""
    setting = os.environ.get("TF_CPU_ALLOCATOR_USE_BFC")
    if bfc_allocator():
        reason = "oneDNN's" if onednn_enabled() else f"TF_CPU_ALLOCATOR_USE_BFC={setting}"
        return f"BFC ({reason})"
    suffix = f", TF_CPU_ALLOCATOR_USE_BFC={setting}" if setting is not None else ""
    return f"TensorFlow's default (frees large buffers to the OS{suffix})"


def onednn_description():
    state = {True: "on", False: "off", None: "unknown"}[onednn_enabled()]
    setting = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    return f"oneDNN {state} (TF_ENABLE_ONEDNN_OPTS={'unset' if setting is None else setting})"


def describe():
    """One line: CPU model, cores and relevant flags, oneDNN, CPU allocator."""
    flags = cpu_flags()
    flag_text = "flags unknown" if flags is None else " ".join(flags) or "no AVX"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores ({platform.machine()}; {flag_text}); "
        f"{onednn_description()}; CPU allocator: {allocator_description()}"
    )


def _cpuinfo_fields():
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    fields = []
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            fields.append((key.strip(), value.strip()))
    return fields


if __name__ == "__main__":
    print(describe())
