// Host emulation of the CUDA dense kernels' maths, for tests on machines without a GPU.
//
// Runs the exact functions of dense_kd_math.cuh (the ones the kernels call) with the cluster
// kernel's decomposition: a row is cut into `n_ctas` slices (chunk rounded up to a vector of
// E elements), each slice into `n_threads` threads that fold E-element groups at offsets
// step * n_threads * E + tid * E; thread partials are merged into a CTA partial, CTA partials
// into the row (in rank order), then the second reduction (JSD / TVD), the row loss and the
// gradients. Not emulated: dtype conversion (inputs are float32 here), the warp butterfly
// order, barriers, memory traffic. Row strides and the terms output are emulated (each
// tensor's own row stride; terms written by the kernels' write_row / write_ignored_row). Built by tests/test_cuda_math_emulation.py with the host
// C++ compiler and loaded through ctypes; not part of the extension.
#include <cmath>
#include <cstdint>
#include <vector>

#include "cuda/dense_kd_math.cuh"

namespace {

using namespace fastkd;
using namespace fastkd::kd_math;

constexpr int kE = 4;

struct Shape {
  int n_ctas;
  int n_threads;
};

// Folds the thread `tid` elements of slice [begin, begin + len) of row (s, t).
template <int kDiv>
RowStats thread_stats(const float* s, const float* t, int64_t begin, int64_t len, int tid,
                      int n_threads, const RowOptions& o) {
  RowStats st = empty_stats();
  const int64_t step = static_cast<int64_t>(n_threads) * kE;
  for (int64_t base = 0; base < len; base += step) {
    float sv[kE], tv[kE];
    bool ok[kE];
    for (int k = 0; k < kE; ++k) {
      const int64_t off = base + static_cast<int64_t>(tid) * kE + k;
      ok[k] = off < len;
      sv[k] = ok[k] ? s[begin + off] : 0.0f;
      tv[k] = ok[k] ? t[begin + off] : 0.0f;
    }
    accumulate<kDiv, kE>(st, sv, tv, ok, o);
  }
  return st;
}

template <int kDiv>
void emulate_row(const DenseKDParams& p, const RowOptions& o, int64_t row, Shape shape) {
  const int64_t v = p.vocab;
  const float* s = static_cast<const float*>(p.student) + row * p.student_row_stride;
  const float* t = static_cast<const float*>(p.teacher) + row * p.teacher_row_stride;
  float* gs = p.grad_student
                  ? static_cast<float*>(p.grad_student) + row * p.grad_student_row_stride
                  : nullptr;
  float* gt = p.grad_teacher
                  ? static_cast<float*>(p.grad_teacher) + row * p.grad_teacher_row_stride
                  : nullptr;
  const int64_t y = p.target ? p.target[row] : -1;
  if (p.target && y == p.ignore_index) {
    for (int64_t j = 0; j < v; ++j) {
      if (gs) gs[j] = 0.0f;
      if (gt) gt[j] = 0.0f;
    }
    write_ignored_row(p, row);
    return;
  }
  const int64_t per_cta = (v + shape.n_ctas - 1) / shape.n_ctas;
  const int64_t chunk = (per_cta + kE - 1) / kE * kE;
  RowStats total = empty_stats();
  for (int r = 0; r < shape.n_ctas; ++r) {
    const int64_t begin = r * chunk;
    const int64_t len = begin < v ? (v - begin < chunk ? v - begin : chunk) : 0;
    RowStats cta = empty_stats();
    for (int tid = 0; tid < shape.n_threads; ++tid) {
      merge<kDiv>(cta, thread_stats<kDiv>(s, t, begin, len, tid, shape.n_threads, o), o);
    }
    if (o.has_ce && y >= begin && y < begin + len) cta.zy = capped(s[y], o);
    else if (o.has_ce && r == 0 && (y < 0 || y >= v)) cta.zy = NAN;
    merge<kDiv>(total, cta, o);
  }
  RowScalars rs = finish_stats<kDiv>(total, o);
  if (needs_second_reduction(kDiv) && o.has_div) {
    float acc[3] = {0.0f, 0.0f, 0.0f};
    for (int r = 0; r < shape.n_ctas; ++r) {
      const int64_t begin = r * chunk;
      const int64_t len = begin < v ? (v - begin < chunk ? v - begin : chunk) : 0;
      float cta[3] = {0.0f, 0.0f, 0.0f};
      for (int tid = 0; tid < shape.n_threads; ++tid) {
        float part[3] = {0.0f, 0.0f, 0.0f};
        const int64_t step = static_cast<int64_t>(shape.n_threads) * kE;
        for (int64_t base = 0; base < len; base += step) {
          for (int k = 0; k < kE; ++k) {
            const int64_t off = base + static_cast<int64_t>(tid) * kE + k;
            if (off < len) accumulate_second<kDiv>(part, s[begin + off], t[begin + off], true, rs, o);
          }
        }
        for (int i = 0; i < 3; ++i) cta[i] += part[i];
      }
      for (int i = 0; i < 3; ++i) acc[i] += cta[i];
    }
    finish_second<kDiv>(rs, acc, o);
  }
  write_row(p, row, rs, o);
  for (int64_t j = 0; j < v; ++j) {  // reads s[j], t[j] before writing gs[j] (may alias s)
    float g_s, g_t;
    grad_element<kDiv>(s[j], o.has_div ? t[j] : 0.0f, j == y, rs, o, g_s, g_t);
    if (gs) gs[j] = g_s;
    if (gt) gt[j] = g_t;
  }
}

template <int kDiv>
void emulate(const DenseKDParams& p, Shape shape) {
  const RowOptions o = make_row_options(p);
  for (int64_t row = 0; row < p.n_rows; ++row) emulate_row<kDiv>(p, o, row, shape);
}

}  // namespace

// Same arguments as fastkd::dense_kd on float32 (N, V) arrays with unit column stride and
// the given row strides (elements), plus the terms output ((N, 2) or null) and the emulated
// decomposition. Returns 0, or -1 on a bad divergence code / shape.
extern "C" int fastkd_emulate_dense_kd(const float* student, const float* teacher,
                                       const int64_t* target, float* rows, float* grad_student,
                                       float* grad_teacher, float* terms, int64_t n_rows,
                                       int64_t vocab, int64_t student_row_stride,
                                       int64_t teacher_row_stride,
                                       int64_t grad_student_row_stride,
                                       int64_t grad_teacher_row_stride, float temperature,
                                       float ce_weight, float div_weight, int divergence,
                                       float param_a, float param_b, int64_t ignore_index, float label_smoothing,
                                       float softcap, int n_ctas, int n_threads) {
  if (n_ctas < 1 || n_threads < 1 || vocab < 1) return -1;
  DenseKDParams p{};
  p.student = student;
  p.teacher = teacher;
  p.target = target;
  p.rows = rows;
  p.grad_student = grad_student;
  p.grad_teacher = grad_teacher;
  p.terms = terms;
  p.n_rows = n_rows;
  p.vocab = vocab;
  p.student_row_stride = student_row_stride;
  p.teacher_row_stride = teacher_row_stride;
  p.grad_student_row_stride = grad_student_row_stride;
  p.grad_teacher_row_stride = grad_teacher_row_stride;
  p.temperature = temperature;
  p.ce_weight = ce_weight;
  p.div_weight = div_weight;
  p.divergence = divergence;
  p.param_a = param_a;
  p.param_b = param_b;
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.softcap = softcap;
  const Shape shape{n_ctas, n_threads};
  switch (divergence) {
    case kKL: emulate<kKL>(p, shape); return 0;
    case kReverseKL: emulate<kReverseKL>(p, shape); return 0;
    case kJSD: emulate<kJSD>(p, shape); return 0;
    case kTVD: emulate<kTVD>(p, shape); return 0;
    case kSkewKL: emulate<kSkewKL>(p, shape); return 0;
    case kSkewReverseKL: emulate<kSkewReverseKL>(p, shape); return 0;
    case kAlphaBeta: emulate<kAlphaBeta>(p, shape); return 0;
    default: return -1;
  }
}
