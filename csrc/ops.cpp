// alphaedit_fast._C: compiled versions of two hot ops (definitions: alphaedit_fast/ops/ref.py).
//
//   gather_segment_mean(hidden, positions, segment_ids, weights, n_segments) -> (n_segments, D)
//   add_at_positions(hidden, positions, row_to_request, delta) -> contiguous copy of hidden, edited
//   has_cuda() -> whether the CUDA kernels (csrc/ops_cuda.cu) were compiled in
//
// As in the references, the accumulation type is fp32 for fp32/bf16/fp16 hidden and fp64 for fp64
// hidden (CPU only; the CUDA kernels take fp32/bf16/fp16); weights and delta are converted to it, and
// the gather returns it.
//
// CPU: OpenMP, deterministic (every output element is written by one thread, in a fixed order; no
// atomics). CUDA (built with WITH_CUDA): the tensors are checked and allocated here and handed to the
// plain C++ launchers of ops_cuda.cu on the current stream. Neither op records autograd history: the
// Python layer uses the references where a gradient is needed.
#include <torch/extension.h>

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops_cuda.h"
#endif

namespace {

constexpr int64_t kChunk = 256;                // D elements per CPU task (the accumulators stay in L1)
// Elements below which one thread does it all: ~50 us of serial work, well above the cost of an
// OpenMP fork/join (measured: 2 threads lose below ~500K bf16 elements on a 2-core VM).
constexpr int64_t kParallelMinWork = 1 << 19;

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// torch.promote_types(hidden.dtype, float32), the references' accumulation type.
at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_hidden(const char* op, const at::Tensor& hidden) {
  TORCH_CHECK(hidden.dim() == 3, op, ": hidden must be 3-D (B, T, D), got shape ", hidden.sizes());
  TORCH_CHECK(is_supported_float(hidden.scalar_type()), op,
              ": hidden must be float32, bfloat16, float16 or float64, got ", hidden.scalar_type());
}

void check_index_vector(const char* op, const char* name, const at::Tensor& t, int64_t B, const at::Tensor& hidden) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, op, ": ", name, " must have shape (B,) = (", B, ",), got ", t.sizes());
  TORCH_CHECK(t.device() == hidden.device(), op, ": ", name, " is on ", t.device(), " but hidden is on ",
              hidden.device());
}

// positions[i] (CPU, contiguous) made non-negative as in Python indexing, after a range check.
std::vector<int64_t> wrapped_positions(const char* op, const at::Tensor& positions, int64_t T, int64_t P) {
  const int64_t n = positions.numel();
  const int64_t* p = positions.data_ptr<int64_t>();
  std::vector<int64_t> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = p[i];
    TORCH_CHECK(v >= -T && v < T, op, ": positions[", i / P, "]",
                (positions.dim() == 2 ? "[" + std::to_string(i % P) + "]" : std::string()), " = ", v,
                " is out of range for a sequence of length T = ", T);
    out[static_cast<size_t>(i)] = v < 0 ? v + T : v;
  }
  return out;
}

// Loads widened to the accumulation type. bf16 and fp16 go through their bits with branch-free code
// that GCC vectorises at the baseline ISA (c10::Half's conversion does not vectorise without F16C);
// both are exact for every input, NaN and subnormals included.
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

template <typename acc_t, typename scalar_t>
inline acc_t widen(scalar_t x) {
  return static_cast<acc_t>(x);
}

template <>
inline float widen<float, c10::BFloat16>(c10::BFloat16 x) {
  return f32_from_bits(static_cast<uint32_t>(x.x) << 16);
}

template <>
inline float widen<float, c10::Half>(c10::Half x) {  // as c10::detail::fp16_ieee_to_fp32_value, with a masked select
  const uint32_t w = static_cast<uint32_t>(x.x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t mask = 0u - static_cast<uint32_t>(two_w < (1u << 27));
  return f32_from_bits(sign | (f32_bits(denormalized) & mask) | (f32_bits(normalized) & ~mask));
}

#if defined(__GNUC__)
#define AEF_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define AEF_ALWAYS_INLINE inline
#endif

// acc[0, len) += sum over the rows of one segment of (mean_p hidden[b, pos[b, p], d0 + .]) * w[b], in row order.
// With one position per row, four rows go through the accumulators at once (same order of operations).
template <typename scalar_t, typename acc_t, bool kUnitStride>
AEF_ALWAYS_INLINE void gather_segment_chunk_body(const scalar_t* hidden, int64_t sB, int64_t sT, int64_t sD,
                                                 const int64_t* pos, int64_t P, const int64_t* rows, int64_t n_rows,
                                                 const acc_t* weights, int64_t d0, int64_t len, acc_t* acc) {
  const int64_t step = kUnitStride ? 1 : sD;
  const scalar_t* base = hidden + d0 * step;
  if (P == 1) {  // the mean of one value is the value itself (x / 1 == x exactly)
    int64_t r = 0;
    for (; r + 4 <= n_rows; r += 4) {
      const int64_t b0 = rows[r], b1 = rows[r + 1], b2 = rows[r + 2], b3 = rows[r + 3];
      const scalar_t* __restrict s0 = base + b0 * sB + pos[b0] * sT;
      const scalar_t* __restrict s1 = base + b1 * sB + pos[b1] * sT;
      const scalar_t* __restrict s2 = base + b2 * sB + pos[b2] * sT;
      const scalar_t* __restrict s3 = base + b3 * sB + pos[b3] * sT;
      const acc_t w0 = weights[b0], w1 = weights[b1], w2 = weights[b2], w3 = weights[b3];
      for (int64_t d = 0; d < len; ++d) {
        acc_t a = acc[d];
        a += widen<acc_t>(s0[d * step]) * w0;
        a += widen<acc_t>(s1[d * step]) * w1;
        a += widen<acc_t>(s2[d * step]) * w2;
        a += widen<acc_t>(s3[d * step]) * w3;
        acc[d] = a;
      }
    }
    for (; r < n_rows; ++r) {
      const int64_t b = rows[r];
      const scalar_t* __restrict src = base + b * sB + pos[b] * sT;
      const acc_t w = weights[b];
      for (int64_t d = 0; d < len; ++d) acc[d] += widen<acc_t>(src[d * step]) * w;
    }
    return;
  }
  // Several positions: their sum in position order (up to four per pass), then / P * w as the mean.
  const acc_t count = static_cast<acc_t>(P);
  acc_t racc[kChunk];
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t b = rows[r];
    const acc_t w = weights[b];
    const scalar_t* row = base + b * sB;
    const int64_t* pb = pos + b * P;
    for (int64_t p = 0; p < P; p += 4) {
      const int64_t m = std::min<int64_t>(4, P - p);
      const scalar_t* __restrict s0 = row + pb[p] * sT;
      const scalar_t* __restrict s1 = row + pb[p + (m > 1)] * sT;
      const scalar_t* __restrict s2 = row + pb[p + (m > 2) * 2] * sT;
      const scalar_t* __restrict s3 = row + pb[p + (m > 3) * 3] * sT;
      if (m == 4) {
        if (p == 0) {
          for (int64_t d = 0; d < len; ++d)
            racc[d] = ((widen<acc_t>(s0[d * step]) + widen<acc_t>(s1[d * step])) + widen<acc_t>(s2[d * step])) +
                      widen<acc_t>(s3[d * step]);
        } else {
          for (int64_t d = 0; d < len; ++d)
            racc[d] = (((racc[d] + widen<acc_t>(s0[d * step])) + widen<acc_t>(s1[d * step])) +
                       widen<acc_t>(s2[d * step])) + widen<acc_t>(s3[d * step]);
        }
      } else {
        for (int64_t q = 0; q < m; ++q) {
          const scalar_t* __restrict src = row + pb[p + q] * sT;
          if (p + q == 0) {
            for (int64_t d = 0; d < len; ++d) racc[d] = widen<acc_t>(src[d * step]);
          } else {
            for (int64_t d = 0; d < len; ++d) racc[d] += widen<acc_t>(src[d * step]);
          }
        }
      }
    }
    for (int64_t d = 0; d < len; ++d) acc[d] += (racc[d] / count) * w;
  }
}

// The same loops compiled for the baseline ISA and, on x86, for AVX2 (picked at run time). AVX2
// without FMA: the same roundings in the same order, so both give identical results.
template <typename scalar_t, typename acc_t, bool kUnitStride>
void gather_segment_chunk(const scalar_t* hidden, int64_t sB, int64_t sT, int64_t sD, const int64_t* pos, int64_t P,
                          const int64_t* rows, int64_t n_rows, const acc_t* weights, int64_t d0, int64_t len,
                          acc_t* acc) {
  gather_segment_chunk_body<scalar_t, acc_t, kUnitStride>(hidden, sB, sT, sD, pos, P, rows, n_rows, weights, d0, len,
                                                          acc);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define AEF_X86_AVX2 1
template <typename scalar_t, typename acc_t, bool kUnitStride>
__attribute__((target("avx2"))) void gather_segment_chunk_avx2(const scalar_t* hidden, int64_t sB, int64_t sT,
                                                               int64_t sD, const int64_t* pos, int64_t P,
                                                               const int64_t* rows, int64_t n_rows,
                                                               const acc_t* weights, int64_t d0, int64_t len,
                                                               acc_t* acc) {
  gather_segment_chunk_body<scalar_t, acc_t, kUnitStride>(hidden, sB, sT, sD, pos, P, rows, n_rows, weights, d0, len,
                                                          acc);
}

bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has;
}
#endif

template <typename scalar_t, typename acc_t, bool kUnitStride>
void gather_segment_chunk_dispatch(const scalar_t* hidden, int64_t sB, int64_t sT, int64_t sD, const int64_t* pos,
                                   int64_t P, const int64_t* rows, int64_t n_rows, const acc_t* weights, int64_t d0,
                                   int64_t len, acc_t* acc) {
#ifdef AEF_X86_AVX2
  if (cpu_has_avx2()) {
    gather_segment_chunk_avx2<scalar_t, acc_t, kUnitStride>(hidden, sB, sT, sD, pos, P, rows, n_rows, weights, d0,
                                                            len, acc);
    return;
  }
#endif
  gather_segment_chunk<scalar_t, acc_t, kUnitStride>(hidden, sB, sT, sD, pos, P, rows, n_rows, weights, d0, len, acc);
}

// One task per (segment, D chunk): each output element is written by exactly one thread.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void gather_segment_mean_tasks(const scalar_t* h, int64_t sB, int64_t sT, int64_t sD, int64_t D, const int64_t* pos,
                               int64_t P, const int64_t* row_ptr, const int64_t* rows, const acc_t* w,
                               int64_t n_segments, acc_t* out, bool parallel) {
  const int64_t n_chunks = (D + kChunk - 1) / kChunk;
  const int64_t n_tasks = n_segments * n_chunks;
#pragma omp parallel for schedule(dynamic, 1) if (parallel && n_tasks > 1)
  for (int64_t task = 0; task < n_tasks; ++task) {
    const int64_t s = task / n_chunks;
    const int64_t d0 = (task % n_chunks) * kChunk;
    const int64_t len = std::min(kChunk, D - d0);
    const int64_t begin = row_ptr[s], n_rows = row_ptr[s + 1] - begin;
    if (n_rows == 0) continue;  // out is zero there already
    acc_t acc[kChunk];
    std::fill(acc, acc + len, acc_t(0));
    if (sD == 1)
      gather_segment_chunk_dispatch<scalar_t, acc_t, true>(h, sB, sT, 1, pos, P, rows + begin, n_rows, w, d0, len,
                                                            acc);
    else
      gather_segment_chunk_dispatch<scalar_t, acc_t, false>(h, sB, sT, sD, pos, P, rows + begin, n_rows, w, d0,
                                                             len, acc);
    std::memcpy(out + s * D + d0, acc, static_cast<size_t>(len) * sizeof(acc_t));
  }
}

// out (B, T, D) contiguous: out[b, pos[b]] = cast(acc(out[b, pos[b]]) + delta[req[b]]); one row per iteration.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void add_at_positions_rows(scalar_t* out, int64_t B, int64_t T, int64_t D, const int64_t* pos, const int64_t* req,
                           const acc_t* delta, bool parallel) {
#pragma omp parallel for schedule(static) if (parallel && B > 1)
  for (int64_t b = 0; b < B; ++b) {
    scalar_t* dst = out + (b * T + pos[b]) * D;
    const acc_t* src = delta + req[b] * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(widen<acc_t>(dst[d]) + src[d]);
  }
}

at::Tensor gather_segment_mean_cpu(const at::Tensor& hidden, const at::Tensor& positions2d,
                                   const at::Tensor& segment_ids, const at::Tensor& weights, int64_t n_segments) {
  static const char* op = "gather_segment_mean";
  const int64_t B = hidden.size(0), T = hidden.size(1), D = hidden.size(2), P = positions2d.size(1);
  const at::ScalarType acc = acc_type(hidden.scalar_type());
  at::Tensor out = at::zeros({n_segments, D}, hidden.options().dtype(acc));
  if (B == 0 || D == 0 || n_segments == 0) return out;

  const at::Tensor pos_c = positions2d.contiguous();
  const std::vector<int64_t> pos = wrapped_positions(op, pos_c, T, P);
  const at::Tensor seg_c = segment_ids.contiguous();
  const at::Tensor w_c = weights.to(acc).contiguous();
  const int64_t* seg = seg_c.data_ptr<int64_t>();

  // Stable bucketing of the rows by segment (CSR): rows[row_ptr[s] .. row_ptr[s + 1]) in increasing b.
  std::vector<int64_t> row_ptr(static_cast<size_t>(n_segments) + 1, 0), rows(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = seg[b];
    TORCH_CHECK(s >= 0 && s < n_segments, op, ": segment_ids[", b, "] = ", s, " is out of range [0, ", n_segments,
                ")");
    ++row_ptr[static_cast<size_t>(s) + 1];
  }
  for (int64_t s = 0; s < n_segments; ++s) row_ptr[s + 1] += row_ptr[s];
  {
    std::vector<int64_t> cursor(row_ptr.begin(), row_ptr.end() - 1);
    for (int64_t b = 0; b < B; ++b) rows[cursor[seg[b]]++] = b;
  }

  const bool parallel = B * P * D >= kParallelMinWork;
  const int64_t sB = hidden.stride(0), sT = hidden.stride(1), sD = hidden.stride(2);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "gather_segment_mean_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gather_segment_mean_tasks<scalar_t>(hidden.data_ptr<scalar_t>(), sB, sT, sD, D, pos.data(), P, row_ptr.data(),
                                        rows.data(), w_c.data_ptr<acc_t>(), n_segments, out.data_ptr<acc_t>(),
                                        parallel);
  });
  return out;
}

at::Tensor add_at_positions_cpu(const at::Tensor& hidden, const at::Tensor& positions,
                                const at::Tensor& row_to_request, const at::Tensor& delta) {
  static const char* op = "add_at_positions";
  const int64_t B = hidden.size(0), T = hidden.size(1), D = hidden.size(2), N = delta.size(0);
  const at::Tensor pos_c = positions.contiguous();
  const std::vector<int64_t> pos = wrapped_positions(op, pos_c, T, 1);
  const at::Tensor req_c = row_to_request.contiguous();
  const int64_t* req = req_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(req[b] >= 0 && req[b] < N, op, ": row_to_request[", b, "] = ", req[b],
                " is out of range [0, N) with N = ", N, " rows of delta");

  at::Tensor out = at::empty(hidden.sizes(), hidden.options().memory_format(at::MemoryFormat::Contiguous));
  out.copy_(hidden);
  if (B == 0 || D == 0) return out;
  const at::Tensor delta_c = delta.to(acc_type(hidden.scalar_type())).contiguous();
  const bool parallel = B * D >= kParallelMinWork;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "add_at_positions_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    add_at_positions_rows<scalar_t>(out.data_ptr<scalar_t>(), B, T, D, pos.data(), req, delta_c.data_ptr<acc_t>(),
                                    parallel);
  });
  return out;
}

#ifdef WITH_CUDA
alphaedit_fast::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return alphaedit_fast::DType::kFloat32;
    case at::kHalf: return alphaedit_fast::DType::kFloat16;
    case at::kBFloat16: return alphaedit_fast::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "alphaedit_fast._C: the CUDA kernels take float32, bfloat16 or float16, got ", t,
                  " (the torch backend handles it)");
  }
}

void check_cuda(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA): kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor gather_segment_mean_cuda(const at::Tensor& hidden, const at::Tensor& positions2d,
                                    const at::Tensor& segment_ids, const at::Tensor& weights, int64_t n_segments) {
  static const char* op = "gather_segment_mean";
  const alphaedit_fast::DType dtype = cuda_dtype(hidden.scalar_type());
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t B = hidden.size(0), T = hidden.size(1), D = hidden.size(2), P = positions2d.size(1);
  if (B == 0 || D == 0 || n_segments == 0) return at::zeros({n_segments, D}, hidden.options().dtype(at::kFloat));
  at::Tensor out = at::empty({n_segments, D}, hidden.options().dtype(at::kFloat));  // fully written
  const at::Tensor pos_c = positions2d.contiguous();
  const at::Tensor seg_c = segment_ids.contiguous();
  const at::Tensor w_c = weights.to(at::kFloat).contiguous();
  // row_ptr (S + 1), cursor (S), row_idx (B)
  at::Tensor ws = at::empty({2 * n_segments + 1 + B}, hidden.options().dtype(at::kLong));
  int64_t* row_ptr = ws.data_ptr<int64_t>();
  int64_t* cursor = row_ptr + n_segments + 1;
  int64_t* row_idx = cursor + n_segments;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  check_cuda(op, alphaedit_fast::launch_build_segment_csr(seg_c.data_ptr<int64_t>(), B, n_segments, row_ptr, cursor,
                                                          row_idx, stream));
  check_cuda(op, alphaedit_fast::launch_gather_segment_mean(
                     hidden.data_ptr(), dtype, B, T, D, hidden.stride(0), hidden.stride(1),
                     hidden.stride(2), pos_c.data_ptr<int64_t>(), P, row_ptr, row_idx, w_c.data_ptr<float>(),
                     n_segments, out.data_ptr<float>(), stream));
  return out;
}

at::Tensor add_at_positions_cuda(const at::Tensor& hidden, const at::Tensor& positions,
                                 const at::Tensor& row_to_request, const at::Tensor& delta) {
  static const char* op = "add_at_positions";
  const alphaedit_fast::DType dtype = cuda_dtype(hidden.scalar_type());
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t B = hidden.size(0), T = hidden.size(1), D = hidden.size(2), N = delta.size(0);
  at::Tensor out = at::empty(hidden.sizes(), hidden.options().memory_format(at::MemoryFormat::Contiguous));
  out.copy_(hidden);
  if (B == 0 || D == 0) return out;
  const at::Tensor pos_c = positions.contiguous();
  const at::Tensor req_c = row_to_request.contiguous();
  const at::Tensor delta_c = delta.to(at::kFloat).contiguous();
  check_cuda(op, alphaedit_fast::launch_add_at_positions(out.data_ptr(), dtype, B, T, D,
                                                         pos_c.data_ptr<int64_t>(), req_c.data_ptr<int64_t>(),
                                                         delta_c.data_ptr<float>(), N,
                                                         at::cuda::getCurrentCUDAStream()));
  return out;
}
#endif  // WITH_CUDA

at::Tensor gather_segment_mean(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& segment_ids,
                               const at::Tensor& weights, int64_t n_segments) {
  static const char* op = "gather_segment_mean";
  const at::NoGradGuard no_grad;
  check_hidden(op, hidden);
  const int64_t B = hidden.size(0);
  TORCH_CHECK(positions.scalar_type() == at::kLong, op, ": positions must be int64, got ", positions.scalar_type());
  TORCH_CHECK((positions.dim() == 1 || positions.dim() == 2) && positions.size(0) == B, op,
              ": positions must have shape (B,) or (B, P) with B = ", B, ", got ", positions.sizes());
  TORCH_CHECK(positions.device() == hidden.device(), op, ": positions is on ", positions.device(),
              " but hidden is on ", hidden.device());
  const at::Tensor positions2d = positions.dim() == 1 ? positions.reshape({B, 1}) : positions;
  TORCH_CHECK(B == 0 || positions2d.size(1) > 0, op, ": positions must hold at least one position per row, got shape ",
              positions.sizes());
  check_index_vector(op, "segment_ids", segment_ids, B, hidden);
  TORCH_CHECK(at::isFloatingType(weights.scalar_type()), op, ": weights must be floating point (float32), got ",
              weights.scalar_type());
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == B, op, ": weights must have shape (B,) = (", B, ",), got ",
              weights.sizes());
  TORCH_CHECK(weights.device() == hidden.device(), op, ": weights is on ", weights.device(), " but hidden is on ",
              hidden.device());
  TORCH_CHECK(n_segments >= 0, op, ": n_segments must be >= 0, got ", n_segments);
  TORCH_CHECK(B == 0 || n_segments > 0, op, ": n_segments must be > 0 when there are rows (B = ", B, ")");
  if (hidden.is_cuda()) {
#ifdef WITH_CUDA
    return gather_segment_mean_cuda(hidden, positions2d, segment_ids, weights, n_segments);
#else
    TORCH_CHECK(false, op, ": alphaedit_fast._C was built without CUDA; got a tensor on ", hidden.device());
#endif
  }
  TORCH_CHECK(hidden.device().is_cpu(), op, ": unsupported device ", hidden.device());
  return gather_segment_mean_cpu(hidden, positions2d, segment_ids, weights, n_segments);
}

at::Tensor add_at_positions(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& row_to_request,
                            const at::Tensor& delta) {
  static const char* op = "add_at_positions";
  const at::NoGradGuard no_grad;
  check_hidden(op, hidden);
  const int64_t B = hidden.size(0), D = hidden.size(2);
  check_index_vector(op, "positions", positions, B, hidden);
  check_index_vector(op, "row_to_request", row_to_request, B, hidden);
  TORCH_CHECK(at::isFloatingType(delta.scalar_type()), op, ": delta must be floating point (float32), got ",
              delta.scalar_type());
  TORCH_CHECK(delta.dim() == 2 && delta.size(1) == D, op, ": delta must have shape (N, D) with D = ", D, ", got ",
              delta.sizes());
  TORCH_CHECK(delta.device() == hidden.device(), op, ": delta is on ", delta.device(), " but hidden is on ",
              hidden.device());
  TORCH_CHECK(B == 0 || delta.size(0) > 0, op, ": delta has no rows but B = ", B, " rows are to be edited");
  if (hidden.is_cuda()) {
#ifdef WITH_CUDA
    return add_at_positions_cuda(hidden, positions, row_to_request, delta);
#else
    TORCH_CHECK(false, op, ": alphaedit_fast._C was built without CUDA; got a tensor on ", hidden.device());
#endif
  }
  TORCH_CHECK(hidden.device().is_cpu(), op, ": unsupported device ", hidden.device());
  return add_at_positions_cpu(hidden, positions, row_to_request, delta);
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "alphaedit_fast compiled hot ops (CPU/OpenMP, and CUDA when built WITH_CUDA); see alphaedit_fast/ops/ref.py";
  m.def("gather_segment_mean", &gather_segment_mean, py::arg("hidden"), py::arg("positions"), py::arg("segment_ids"),
        py::arg("weights"), py::arg("n_segments"),
        "out[s] = sum over rows b with segment_ids[b] == s of weights[b] * mean_p hidden[b, positions[b, p]]; "
        "(n_segments, D) float32, accumulated in float32.");
  m.def("add_at_positions", &add_at_positions, py::arg("hidden"), py::arg("positions"), py::arg("row_to_request"),
        py::arg("delta"),
        "A contiguous copy of hidden with out[b, positions[b]] = (float(hidden[b, positions[b]]) + "
        "delta[row_to_request[b]]) cast to hidden's dtype.");
  m.def("has_cuda", &has_cuda, "True when the CUDA kernels were compiled in (WITH_CUDA).");
}
