// The operator library: every schema of fused_loss in one place. Kernels register
// themselves per backend (csrc/cpu/*.cpp, csrc/cuda/*.cu); fake kernels and autograd
// live in fused_loss/ops.py.
#include <Python.h>

#include <torch/library.h>

// `import fused_loss._C` loads this shared library, which runs the registrations below.
// No functions are bound: ops are reached through torch.ops.fused_loss. One constant is:
// _C.CPU_CAPABILITY, the vector extension the CPU kernels were built for (setup.py).
#ifndef FUSED_LOSS_CPU_CAPABILITY
#define FUSED_LOSS_CPU_CAPABILITY "DEFAULT"
#endif
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddStringConstant(m, "CPU_CAPABILITY", FUSED_LOSS_CPU_CAPABILITY) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}

TORCH_LIBRARY(fused_loss, m) {
  // Class-index targets. Returns the loss (reduced as asked), the row statistics the
  // backward needs besides the inputs (a (2, rows) tensor of row maxima and log-sums) and,
  // when compute_grad is set, the input's gradient for an upstream gradient of 1, written in
  // the same pass (reductions mean and sum; otherwise an empty tensor).
  // LLM options: logits z = softcap * tanh(x / softcap) / temperature; z_loss adds
  // z_loss * w_y * lse(z)^2 per row; return_stats makes stats (5, rows): max, log_sum,
  // entropy, correct (0/1) and the z-loss term of each row. softcap, temperature and
  // return_stats take (N, C) input only. acc_loss: the loss in the accumulation type (float32
  // for 16-bit input: torch's dtype under autocast) instead of the input's.
  m.def(
      "cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, int reduction, int ignore_index, "
      "float label_smoothing, bool compute_grad, float? softcap=None, float temperature=1.0, float z_loss=0.0, "
      "bool return_stats=False, bool acc_loss=False) -> (Tensor loss, Tensor stats, Tensor grad)");
  // The same for contiguous (N, C) logits that are not needed afterwards, reductions mean and
  // sum: they are overwritten with the gradient (for an upstream gradient of 1), so no buffer of
  // their size is allocated (linear cross-entropy's chunks). The loss is in the accumulation
  // type (float32 for 16-bit logits). Not differentiable.
  m.def(
      "cross_entropy_forward_grad_in_place(Tensor(a!) input, Tensor target, Tensor? weight, int reduction, "
      "int ignore_index, float label_smoothing, float? softcap=None, float temperature=1.0, float z_loss=0.0, "
      "bool return_stats=False) -> (Tensor loss, Tensor stats)");
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, Tensor stats, "
      "int reduction, int ignore_index, float label_smoothing, float? softcap=None, float temperature=1.0, "
      "float z_loss=0.0) -> Tensor");
  // The backward into the forward's in-pass gradient (reductions mean and sum): grad_input holds
  // the gradient for an upstream gradient of 1; it is left as it is where grad_loss is exactly 1
  // (read on the device, on CUDA: no host synchronisation), else overwritten with the gradient
  // for grad_loss (the same bits as cross_entropy_backward).
  m.def(
      "cross_entropy_backward_into(Tensor(a!) grad_input, Tensor grad_loss, Tensor input, Tensor target, "
      "Tensor? weight, Tensor stats, int reduction, int ignore_index, float label_smoothing, float? softcap=None, "
      "float temperature=1.0, float z_loss=0.0) -> ()");
  // Probability targets (same shape as input). Its stats have a third row: each row's sum
  // of weighted smoothed targets. compute_grad: the input's gradient, as cross_entropy_forward.
  m.def(
      "cross_entropy_prob_forward(Tensor input, Tensor target, Tensor? weight, int reduction, "
      "float label_smoothing, bool compute_grad=False) -> (Tensor loss, Tensor stats, Tensor grad)");
  m.def(
      "cross_entropy_prob_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, Tensor stats, "
      "int reduction, float label_smoothing, bool input_grad, bool target_grad) -> (Tensor, Tensor)");
  // The input's gradient into the forward's in-pass gradient, as cross_entropy_backward_into.
  m.def(
      "cross_entropy_prob_backward_into(Tensor(a!) grad_input, Tensor grad_loss, Tensor input, Tensor target, "
      "Tensor? weight, Tensor stats, int reduction, float label_smoothing) -> ()");

  // Elementwise losses. Forward returns the loss (per element for reduction 0, else a
  // scalar) and, when compute_grad is set and the reduction is 1 or 2, the input's gradient for
  // an upstream gradient of 1, written in the same pass (otherwise an empty tensor); backward
  // returns (grad_input, grad_target), each empty when not asked for.
  m.def(
      "binary_cross_entropy_with_logits_forward(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
      "int reduction, bool compute_grad) -> (Tensor loss, Tensor grad)");
  m.def(
      "binary_cross_entropy_with_logits_backward(Tensor grad, Tensor input, Tensor target, Tensor? weight, "
      "Tensor? pos_weight, int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor)");
  // <loss>_backward_into: the forward's in-pass gradient of the input (reductions mean and sum) kept
  // where the upstream gradient is exactly 1 (read on the device, on CUDA), else overwritten with
  // the backward's (see cross_entropy_backward_into).
  m.def(
      "binary_cross_entropy_with_logits_backward_into(Tensor(a!) grad_input, Tensor grad, Tensor input, "
      "Tensor target, Tensor? weight, Tensor? pos_weight, int reduction) -> ()");
  m.def(
      "smooth_l1_loss_backward_into(Tensor(a!) grad_input, Tensor grad, Tensor input, Tensor target, int reduction, "
      "float beta) -> ()");
  m.def(
      "huber_loss_backward_into(Tensor(a!) grad_input, Tensor grad, Tensor input, Tensor target, Tensor? weight, "
      "int reduction, float delta) -> ()");
  m.def(
      "sigmoid_focal_loss_backward_into(Tensor(a!) grad_input, Tensor grad, Tensor input, Tensor target, "
      "int reduction, float alpha, float gamma) -> ()");
  m.def(
      "smooth_l1_loss_forward(Tensor input, Tensor target, int reduction, float beta, bool compute_grad) -> "
      "(Tensor loss, Tensor grad)");
  m.def(
      "smooth_l1_loss_backward(Tensor grad, Tensor input, Tensor target, int reduction, float beta, bool input_grad, "
      "bool target_grad) -> (Tensor, Tensor)");
  m.def(
      "huber_loss_forward(Tensor input, Tensor target, Tensor? weight, int reduction, float delta, "
      "bool compute_grad) -> (Tensor loss, Tensor grad)");
  m.def(
      "huber_loss_backward(Tensor grad, Tensor input, Tensor target, Tensor? weight, int reduction, float delta, "
      "bool input_grad, "
      "bool target_grad) -> (Tensor, Tensor)");
  m.def(
      "sigmoid_focal_loss_forward(Tensor input, Tensor target, int reduction, float alpha, float gamma, "
      "bool compute_grad) -> (Tensor loss, Tensor grad)");
  m.def(
      "sigmoid_focal_loss_backward(Tensor grad, Tensor input, Tensor target, int reduction, float alpha, float gamma, "
      "bool input_grad, bool target_grad) -> (Tensor, Tensor)");
}
