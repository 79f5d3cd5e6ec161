// lgd::learnability: fused per-sample learnability score on CPU (docs/method.md §4).
//
//   S = CE(student, y) - omega * CE(reference, y)
//   dS/dstudent = softmax(student) - onehot(y);  dS/dreference = -omega * (softmax(reference) - onehot(y))
//   winners[g] = global index of the first max of S within samples [g*kappa, (g+1)*kappa)
//
// Returns (ce_student, ce_reference, S, grad_student, grad_reference, winners): the first three
// fp32, the gradients in the logits' dtype, winners int64. Math is fp32 throughout; bf16/fp16
// rows are upcast into a per-thread buffer. One row's logits (a few KiB) stay in L1 across the
// max, exp-sum and scale sweeps, so the op reads each logit from memory once and writes once.

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

namespace lgd {
namespace {

using Vec = at::vec::Vectorized<float>;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// CE of logits x at `label`; writes coef * (softmax(x) - onehot(label)) into g (may not alias x).
float ce_and_grad(const float* x, int64_t C, int64_t label, float coef, float* g) {
  const float m = at::vec::reduce_all<float>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, C);
  const Vec vm(m);
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= C; i += Vec::size()) {
    const Vec e = (Vec::loadu(x + i) - vm).exp();
    e.store(g + i);
    acc = acc + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; i < C; ++i) {
    g[i] = std::exp(x[i] - m);
    sum += g[i];
  }
  const float ce = m + std::log(sum) - x[label];
  const float k = coef / sum;
  at::vec::map([k](Vec e) { return e * Vec(k); }, g, g, C);
  g[label] -= coef;
  return ce;
}

// Rows [begin, end). For fp32 the kernel reads and writes the tensors directly; narrower
// dtypes go through fp32 row buffers.
template <typename scalar_t>
void learnability_rows(
    const scalar_t* student, const scalar_t* reference, const int64_t* labels, int64_t C,
    float omega, int64_t begin, int64_t end, float* ce_s, float* ce_r, float* score,
    scalar_t* grad_s, scalar_t* grad_r) {
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  std::vector<float> buf(kFloat ? 0 : 4 * C);
  for (int64_t n = begin; n < end; ++n) {
    const int64_t off = n * C;
    float ce_student, ce_reference;
    if constexpr (kFloat) {
      ce_student = ce_and_grad(student + off, C, labels[n], 1.f, grad_s + off);
      ce_reference = ce_and_grad(reference + off, C, labels[n], -omega, grad_r + off);
    } else {
      float *xs = buf.data(), *xr = xs + C, *gs = xr + C, *gr = gs + C;
      at::vec::convert(student + off, xs, C);
      at::vec::convert(reference + off, xr, C);
      ce_student = ce_and_grad(xs, C, labels[n], 1.f, gs);
      ce_reference = ce_and_grad(xr, C, labels[n], -omega, gr);
      at::vec::convert(gs, grad_s + off, C);
      at::vec::convert(gr, grad_r + off, C);
    }
    ce_s[n] = ce_student;
    ce_r[n] = ce_reference;
    score[n] = ce_student - omega * ce_reference;
  }
}

void check_inputs(const at::Tensor& student, const at::Tensor& reference, const at::Tensor& labels,
                  int64_t kappa) {
  TORCH_CHECK_VALUE(student.dim() == 2, "lgd::learnability: student logits must be [N, C], got ",
                    student.sizes());
  TORCH_CHECK_VALUE(reference.sizes() == student.sizes(), "lgd::learnability: student logits ",
                    student.sizes(), " and reference logits ", reference.sizes(),
                    " differ in shape");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == student.size(0),
                    "lgd::learnability: labels must be [N] = [", student.size(0), "], got ",
                    labels.sizes());
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong,
                    "lgd::learnability: labels must be int64, got ", labels.scalar_type());
  const auto dtype = student.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "lgd::learnability: logits must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(reference.scalar_type() == dtype,
                    "lgd::learnability: student and reference logits differ in dtype (", dtype,
                    " vs ", reference.scalar_type(), ")");
  TORCH_CHECK_VALUE(kappa >= 1, "lgd::learnability: kappa must be >= 1, got ", kappa);
  TORCH_CHECK_VALUE(student.size(0) % kappa == 0, "lgd::learnability: N=", student.size(0),
                    " is not divisible by kappa=", kappa);
}

Outputs learnability_cpu(const at::Tensor& student_in, const at::Tensor& reference_in,
                         const at::Tensor& labels_in, double omega_d, int64_t kappa) {
  check_inputs(student_in, reference_in, labels_in, kappa);
  TORCH_CHECK_VALUE(reference_in.is_cpu() && labels_in.is_cpu(),
                    "lgd::learnability: all tensors must be on the CPU");
  const auto student = student_in.contiguous();
  const auto reference = reference_in.contiguous();
  const auto labels = labels_in.contiguous();
  const int64_t N = student.size(0), C = student.size(1);
  const float omega = static_cast<float>(omega_d);

  const int64_t* lab = labels.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK_INDEX(lab[n] >= 0 && lab[n] < C, "lgd::learnability: labels[", n, "] = ", lab[n],
                      " is out of range for C=", C, " classes");
  }

  const auto f32 = student.options().dtype(at::kFloat);
  auto ce_s = at::empty({N}, f32), ce_r = at::empty({N}, f32), score = at::empty({N}, f32);
  auto grad_s = at::empty_like(student), grad_r = at::empty_like(reference);

  // Rows are independent; >= 8192 logits per tensor per task amortise the thread hand-off.
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(C, 1));
  const auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* s = student.data_ptr<scalar_t>();
    const scalar_t* r = reference.data_ptr<scalar_t>();
    scalar_t* gs = grad_s.data_ptr<scalar_t>();
    scalar_t* gr = grad_r.data_ptr<scalar_t>();
    float *cs = ce_s.data_ptr<float>(), *cr = ce_r.data_ptr<float>(), *sc = score.data_ptr<float>();
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      learnability_rows<scalar_t>(s, r, lab, C, omega, begin, end, cs, cr, sc, gs, gr);
    });
  };
  switch (student.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    default: run(at::Half{}); break;  // check_inputs admitted only these three
  }

  // Rank selection: first max per group (strict '>'), as torch.argmax and the Triton kernel.
  const int64_t G = N / kappa;
  auto winners = at::empty({G}, student.options().dtype(at::kLong));
  const float* sc = score.data_ptr<float>();
  int64_t* win = winners.data_ptr<int64_t>();
  for (int64_t g = 0; g < G; ++g) {
    int64_t best = g * kappa;
    for (int64_t i = best + 1; i < (g + 1) * kappa; ++i) {
      if (sc[i] > sc[best]) best = i;
    }
    win[g] = best;
  }
  return {ce_s, ce_r, score, grad_s, grad_r, winners};
}

// Shapes only (symbolic sizes allowed), so torch.compile / FakeTensor can trace the op.
Outputs learnability_meta(const at::Tensor& student, const at::Tensor& reference,
                          const at::Tensor& labels, double /*omega*/, int64_t kappa) {
  TORCH_CHECK_VALUE(student.dim() == 2 && reference.dim() == 2 && labels.dim() == 1,
                    "lgd::learnability: expected [N, C] logits and [N] labels");
  TORCH_CHECK_VALUE(kappa >= 1, "lgd::learnability: kappa must be >= 1, got ", kappa);
  const c10::SymInt N = student.sym_size(0), C = student.sym_size(1);
  const auto f32 = student.options().dtype(at::kFloat);
  return {at::empty_symint({N}, f32),
          at::empty_symint({N}, f32),
          at::empty_symint({N}, f32),
          at::empty_symint({N, C}, student.options()),
          at::empty_symint({N, C}, reference.options()),
          at::empty_symint({N / kappa}, student.options().dtype(at::kLong))};
}

}  // namespace
}  // namespace lgd

TORCH_LIBRARY(lgd, m) {
  m.def(
      "learnability(Tensor student, Tensor reference, Tensor labels, float omega, int kappa)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lgd, CPU, m) { m.impl("learnability", &lgd::learnability_cpu); }

TORCH_LIBRARY_IMPL(lgd, Meta, m) { m.impl("learnability", &lgd::learnability_meta); }

// A Python module with no functions: `import lgd._C` loads the library, which runs the
// registrations above (no pybind11 needed).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
