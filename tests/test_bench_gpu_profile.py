"""experiments/bench/gpu_profile.py: the trace summary counts kernel-stream time only."""

from experiments.bench import gpu_profile as G


def _meta(pid, tid, what, name):
  return {"ph": "M", "pid": pid, "tid": tid, "name": what, "args": {"name": name}}


def _kernel(pid, tid, name, dur_us, hlo=""):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "dur": dur_us, "ts": 0,
          "args": {"hlo_op": hlo}}


def test_kernel_classes_by_name():
  assert G.kernel_class("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
  assert G.kernel_class("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT") == "matmul"
  assert G.kernel_class("input_reduce_fusion_166") == "reduction"
  assert G.kernel_class("loop_add_fusion") == "fused elementwise"
  assert G.kernel_class("MemcpyD2H") == "copy/transpose"
  assert G.kernel_class("mystery") == "other"


def test_summary_counts_stream_threads_of_the_device_only():
  events = [
      _meta(1, 0, "process_name", "/host:CPU"), _meta(2, 10, "process_name", "/device:GPU:0"),
      _meta(2, 10, "thread_name", "Stream #14(Compute)"), _meta(2, 11, "thread_name", "XLA Ops"),
      _kernel(1, 0, "PjitFunction(step)", 5000.0),              # host: ignored
      _kernel(2, 10, "nvjet_gemm", 300.0, "dot.1"), _kernel(2, 10, "nvjet_gemm", 300.0, "dot.1"),
      _kernel(2, 10, "loop_add_fusion", 400.0, "add.2"),
      _kernel(2, 11, "dot.1", 600.0),                           # summary line: same time again
  ]
  out = G.summarise(events, wall_s=0.002, units=2, unit="step")
  assert out["kernels"] == 3
  assert abs(out["busy_s"] - 0.001) < 1e-12                     # 300 + 300 + 400 us
  assert abs(out["by_class"]["matmul"] - 0.0006) < 1e-12
  assert abs(out["by_class"]["fused elementwise"] - 0.0004) < 1e-12


def test_without_a_device_the_host_events_are_summarised():
  events = [_meta(1, 0, "process_name", "/host:CPU"), _kernel(1, 0, "dot.7", 250.0)]
  out = G.summarise(events, wall_s=0.001, units=1, unit="token")
  assert out["kernels"] == 1 and abs(out["by_class"]["matmul"] - 0.00025) < 1e-12
