// Operator schemas of the earlytom library. Each schema is declared exactly once, here;
// implementations are registered per dispatch key in csrc/cpu/*.cpp and csrc/cuda/*.cu, and both
// start with the op's input checks from csrc/ops/<op>.h. The semantics of every op are documented
// in docs/design.md.
#include <Python.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

extern "C" {
// Importing earlytom_ext._C runs the static TORCH_LIBRARY initialisers below; the module itself
// has no Python-level members (ops are reached through torch.ops.earlytom).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(earlytom, m) {
  m.def(
      "merge_frames(Tensor x, Tensor frame_counts, float tau, int max_window, float ema, "
      "bool keep_last_interior) -> (Tensor out, Tensor out_counts, Tensor plan_src, "
      "Tensor plan_weight, Tensor segments, Tensor segment_counts)");
  m.def("apply_merge_plan(Tensor x, Tensor plan_src, Tensor plan_weight) -> Tensor");
  m.def(
      "segment_frames(Tensor x, Tensor frame_counts, float tau, int max_window, float ema) "
      "-> (Tensor segments, Tensor segment_counts)");
  m.def(
      "segment_frames_deferred(Tensor x, Tensor frame_counts, float tau, int max_window, float ema) "
      "-> (Tensor segments, Tensor segment_counts, Tensor status)");
  m.def("attention_received(Tensor q, Tensor k, float scale) -> Tensor");
  m.def(
      "select_tokens(Tensor feats, Tensor scores, Tensor frame_keep, Tensor frame_static, "
      "int num_out) -> (Tensor tokens, Tensor index)");
}

// None of the ops is differentiable (the compression is a constant; the Python wrappers run them
// without grad): inputs that require grad give outputs whose backward raises, instead of a
// backward that silently returns no gradient.
TORCH_LIBRARY_IMPL(earlytom, Autograd, m) {
  for (const char* op : {"merge_frames", "apply_merge_plan", "segment_frames", "segment_frames_deferred",
                         "attention_received", "select_tokens"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
