"""Peak memory of one call over what was resident before it, on any CPU allocator.

Run in a fresh process per case, after warm-up (compilation and a few calls):

- BFC allocator (on with oneDNN, or with `TF_CPU_ALLOCATOR_USE_BFC=true`):
  TensorFlow's allocator statistics, peak bytes allocated during the call
  minus the bytes allocated before it. `tf.config.experimental`'s
  `reset_memory_stats` and `get_memory_info` work only with this allocator.
- TensorFlow's default CPU allocator: the process's peak resident set size
  during the call (Linux `VmHWM`, reset to the current size through
  `/proc/self/clear_refs` just before it) minus its resident size before the
  call. The process runs with `MALLOC_MMAP_THRESHOLD_=65536`, so glibc maps
  every block of 64 KiB or more on its own and unmaps it when it is freed:
  the resident size then follows the live buffers, as the BFC statistics do,
  instead of depending on what malloc kept from earlier calls.

Both count XLA's buffers (they come from TensorFlow's allocator) and round
(BFC to its bins, the resident size to 4 KiB pages). The median of a few calls
is reported.
"""

import statistics

BFC = "bfc"
RSS = "rss"

METHODS = {
    BFC: "TensorFlow's BFC allocator statistics: peak bytes allocated during the step minus "
    "the bytes allocated before it",
    RSS: "peak resident set size during the step (Linux VmHWM, reset just before it) minus the "
    "resident size before it, with glibc mapping every block of 64 KiB or more on its own "
    "(MALLOC_MMAP_THRESHOLD_=65536) so freed buffers leave the resident set",
}

# Set in the measuring subprocess (glibc reads it at start-up).
SUBPROCESS_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def subprocess_environment(environment):
    """`environment` plus what the measuring subprocess needs."""
    return {**environment, **SUBPROCESS_ENVIRONMENT}


def peak_over_resident(call, repeats=3):
    """`(bytes, method)`: median over `repeats` calls of the peak each adds.

    `call` must already be warmed up (compiled, run once or twice). `RuntimeError`
    if neither method is available (no BFC allocator and no Linux `/proc`).
    """
    from benchmarks.platform_info import bfc_allocator

    if bfc_allocator():
        measure, method = _allocator_peak, BFC
    elif _can_reset_peak_rss():
        measure, method = _rss_peak, RSS
    else:
        raise RuntimeError("needs TensorFlow's BFC allocator or Linux /proc/self/clear_refs")
    peaks = [measure(call) for _ in range(repeats)]
    return int(statistics.median(peaks)), method


def _allocator_peak(call):
    import tensorflow as tf

    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    result = call()
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    del result
    return peak - before


def _rss_peak(call):
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    result = call()
    peak = _status_bytes("VmHWM")
    del result
    return max(peak - before, 0)


def _can_reset_peak_rss():
    try:
        _reset_peak_rss()
        _status_bytes("VmHWM")
    except (OSError, KeyError):
        return False
    return True


def _reset_peak_rss():
    # "5" resets the peak resident set size to the current one (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == field:
                return int(value.split()[0]) * 1024  # the kernel reports kB
    raise KeyError(field)
