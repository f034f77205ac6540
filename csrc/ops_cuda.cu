// CUDA kernels of the hot ops of alphaedit_fast._C; definitions in alphaedit_fast/ops/ref.py.
//
// Compiles standalone (nvcc -c -arch=sm_90 -O3 -std=c++17 csrc/ops_cuda.cu): no torch headers, raw
// pointers only; csrc/ops.cpp does the tensor checks and allocations and passes the current stream.
//
// - launch_build_segment_csr: one block, a stable counting sort of the rows by segment (no atomics
//   on floats, no host synchronisation).
// - gather_segment_mean_kernel: one block per (segment, D tile of 32 lanes x VEC elements); the warps
//   of a block (blockDim.y of them) take interleaved groups of kUnroll rows of the segment, so that
//   kUnroll independent vector loads are in flight per lane, and are then summed in shared memory in
//   warp order: the result only depends on the inputs and the launch shape, never on scheduling.
// - add_at_positions_kernel: one block per (row, D tile), vectorised read-add-cast-write in place.
#include <cstdint>
#include <cstdio>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ops_cuda.h"

namespace alphaedit_fast {
namespace {

// A failed index check stops the kernel (like torch's device-side asserts) rather than reading or
// writing out of bounds.
#define AEF_DEVICE_CHECK(cond, fmt, ...)                                        \
  do {                                                                          \
    if (!(cond)) {                                                              \
      printf("alphaedit_fast._C (CUDA): " fmt "\n", __VA_ARGS__);               \
      __trap();                                                                 \
    }                                                                           \
  } while (0)

// ---------------------------------------------------------------------------------------------
// Element conversions and vector loads.

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// An unsigned type of N bytes, for one aligned vector load or store of N bytes.
template <int N> struct Raw;
template <> struct Raw<2> { using type = unsigned short; };
template <> struct Raw<4> { using type = unsigned int; };
template <> struct Raw<8> { using type = uint2; };
template <> struct Raw<16> { using type = uint4; };

// VEC consecutive elements of T at p (aligned to VEC * sizeof(T)), converted to fp32.
template <typename T, int VEC>
__device__ __forceinline__ void load_as_float(const T* __restrict__ p, float (&v)[VEC]) {
  using R = typename Raw<sizeof(T) * VEC>::type;
  R raw = __ldg(reinterpret_cast<const R*>(p));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < VEC; ++k) v[k] = to_float(e[k]);
}

// The same with an element stride (VEC == 1 in practice).
template <typename T, int VEC>
__device__ __forceinline__ void load_as_float_strided(const T* __restrict__ p, int64_t stride, float (&v)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) v[k] = to_float(p[k * stride]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_from_float(T* p, const float (&v)[VEC]) {
  using R = typename Raw<sizeof(T) * VEC>::type;
  R raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int k = 0; k < VEC; ++k) e[k] = from_float<T>(v[k]);
  *reinterpret_cast<R*>(p) = raw;
}

// VEC fp32 values at p, aligned to min(16, 4 * VEC) bytes.
template <int VEC>
__device__ __forceinline__ void load_floats(const float* __restrict__ p, float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int k = 0; k < VEC; k += 4) {
      const float4 q = __ldg(reinterpret_cast<const float4*>(p + k));
      v[k] = q.x; v[k + 1] = q.y; v[k + 2] = q.z; v[k + 3] = q.w;
    }
  } else if constexpr (VEC == 2) {
    const float2 q = __ldg(reinterpret_cast<const float2*>(p));
    v[0] = q.x; v[1] = q.y;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = __ldg(p + k);
  }
}

template <int VEC>
__device__ __forceinline__ void store_floats(float* p, const float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int k = 0; k < VEC; k += 4) *reinterpret_cast<float4*>(p + k) = make_float4(v[k], v[k + 1], v[k + 2], v[k + 3]);
  } else if constexpr (VEC == 2) {
    *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) p[k] = v[k];
  }
}

__device__ __forceinline__ int64_t wrap_position(int64_t pos, int64_t T, int64_t b) {
  const int64_t w = pos < 0 ? pos + T : pos;
  AEF_DEVICE_CHECK(w >= 0 && w < T, "position %lld of row %lld is out of range for a sequence of length %lld",
                   static_cast<long long>(pos), static_cast<long long>(b), static_cast<long long>(T));
  return w;
}

// ---------------------------------------------------------------------------------------------
// Stable CSR bucketing of rows by segment, one block.

constexpr int kCsrThreads = 1024;

__global__ void __launch_bounds__(kCsrThreads)
build_segment_csr_kernel(const int64_t* __restrict__ seg, int64_t B, int64_t S, int64_t* __restrict__ row_ptr,
                         int64_t* __restrict__ cursor, int64_t* __restrict__ row_idx) {
  __shared__ int64_t sh[kCsrThreads];
  const int t = threadIdx.x;
  const int nt = blockDim.x;

  // 1. Counts of each segment in row_ptr[s + 1] (integer atomics: exact, order-free).
  for (int64_t i = t; i <= S; i += nt) row_ptr[i] = 0;
  __syncthreads();
  for (int64_t b = t; b < B; b += nt) {
    const int64_t s = seg[b];
    AEF_DEVICE_CHECK(s >= 0 && s < S, "segment id %lld of row %lld is out of range [0, %lld)",
                     static_cast<long long>(s), static_cast<long long>(b), static_cast<long long>(S));
    atomicAdd(reinterpret_cast<unsigned long long*>(row_ptr + s + 1), 1ull);
  }
  __syncthreads();

  // 2. Inclusive scan of row_ptr[1 .. S]: thread t sums a contiguous chunk, the block scans the
  //    chunk sums (Hillis-Steele), then each thread rewrites its chunk.
  const int64_t chunk = (S + nt - 1) / nt;
  const int64_t lo = 1 + static_cast<int64_t>(t) * chunk;
  const int64_t hi = lo + chunk < S + 1 ? lo + chunk : S + 1;
  int64_t local = 0;
  for (int64_t i = lo; i < hi; ++i) local += row_ptr[i];
  sh[t] = local;
  __syncthreads();
  for (int off = 1; off < nt; off <<= 1) {
    const int64_t v = t >= off ? sh[t - off] : 0;
    __syncthreads();
    sh[t] += v;
    __syncthreads();
  }
  int64_t prefix = t > 0 ? sh[t - 1] : 0;
  for (int64_t i = lo; i < hi; ++i) {
    prefix += row_ptr[i];
    row_ptr[i] = prefix;
  }
  __syncthreads();
  for (int64_t s = t; s < S; s += nt) cursor[s] = row_ptr[s];
  __syncthreads();

  // 3. Stable scatter, nt rows at a time: a row's place is its segment's cursor plus the number of
  //    earlier rows of the same segment in the tile; the tile's last such row advances the cursor.
  for (int64_t base = 0; base < B; base += nt) {
    const int64_t b = base + t;
    const int n = B - base < nt ? static_cast<int>(B - base) : nt;
    const int64_t s = b < B ? seg[b] : -1;
    __syncthreads();  // the previous tile's reads of sh and cursor are done
    sh[t] = s;
    __syncthreads();
    int rank = 0, same = 0;
    if (b < B) {
      for (int j = 0; j < n; ++j) {
        const bool eq = sh[j] == s;
        same += eq;
        rank += eq && j < t;
      }
      row_idx[cursor[s] + rank] = b;
    }
    __syncthreads();
    if (b < B && rank + 1 == same) cursor[s] += same;
  }
}

// ---------------------------------------------------------------------------------------------
// gather_segment_mean

constexpr int kUnroll = 4;         // rows in flight per warp and lane
constexpr int kMaxGatherWarps = 16;  // blockDim = (32, ny), ny <= kMaxGatherWarps

template <typename T, int VEC>
__global__ void __launch_bounds__(32 * kMaxGatherWarps)
gather_segment_mean_kernel(const T* __restrict__ hidden, int64_t T_len, int64_t D, int64_t sB,
                                           int64_t sT, int64_t sD, const int64_t* __restrict__ positions,
                                           int64_t P, const int64_t* __restrict__ row_ptr,
                                           const int64_t* __restrict__ row_idx, const float* __restrict__ weights,
                                           float* __restrict__ out) {
  extern __shared__ float red[];  // (blockDim.y - 1) x VEC x 32
  const int64_t s = blockIdx.x;
  const int lane = threadIdx.x;
  const int wy = threadIdx.y;
  const int ny = blockDim.y;
  const int64_t d0 = (static_cast<int64_t>(blockIdx.y) * 32 + lane) * VEC;
  const bool active = d0 < D;  // D % VEC == 0, so a lane's vector lies wholly inside or outside
  const int64_t begin = row_ptr[s], end = row_ptr[s + 1];
  const float count = static_cast<float>(P);  // the mean divides, as in the reference

  float acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = 0.f;

  for (int64_t i0 = begin + static_cast<int64_t>(wy) * kUnroll; i0 < end; i0 += static_cast<int64_t>(ny) * kUnroll) {
    int64_t rows[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) rows[u] = i0 + u < end ? row_idx[i0 + u] : -1;
    float racc[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int k = 0; k < VEC; ++k) racc[u][k] = 0.f;
    for (int64_t p = 0; p < P; ++p) {
      const T* src[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        src[u] = nullptr;
        if (rows[u] >= 0) {
          const int64_t pos = wrap_position(positions[rows[u] * P + p], T_len, rows[u]);
          src[u] = hidden + rows[u] * sB + pos * sT + d0 * sD;
        }
      }
      if (active) {
        float v[kUnroll][VEC];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (src[u] != nullptr) {
            if (VEC == 1 || sD == 1) load_as_float<T, VEC>(src[u], v[u]);
            else load_as_float_strided<T, VEC>(src[u], sD, v[u]);
          } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) v[u][k] = 0.f;
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
          for (int k = 0; k < VEC; ++k) racc[u][k] += v[u][k];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (rows[u] >= 0) {
        const float w = weights[rows[u]];
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += (racc[u][k] / count) * w;
      }
    }
  }

  // Sum of the warps' partial sums, in warp order.
  if (wy > 0) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) red[((wy - 1) * VEC + k) * 32 + lane] = acc[k];
  }
  __syncthreads();
  if (wy == 0 && active) {
    for (int y = 1; y < ny; ++y)
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += red[((y - 1) * VEC + k) * 32 + lane];
    store_floats<VEC>(out + s * D + d0, acc);
  }
}

// ---------------------------------------------------------------------------------------------
// add_at_positions

constexpr int kAddThreads = 128;

template <typename T, int VEC>
__global__ void __launch_bounds__(kAddThreads)
add_at_positions_kernel(T* __restrict__ out, int64_t T_len, int64_t D, const int64_t* __restrict__ positions,
                        const int64_t* __restrict__ row_to_request, const float* __restrict__ delta, int64_t N) {
  const int64_t b = blockIdx.x;
  const int64_t d0 = (static_cast<int64_t>(blockIdx.y) * kAddThreads + threadIdx.x) * VEC;
  if (d0 >= D) return;
  const int64_t pos = wrap_position(positions[b], T_len, b);
  const int64_t r = row_to_request[b];
  AEF_DEVICE_CHECK(r >= 0 && r < N, "row_to_request[%lld] = %lld is out of range [0, %lld)",
                   static_cast<long long>(b), static_cast<long long>(r), static_cast<long long>(N));
  T* dst = out + (b * T_len + pos) * D + d0;
  float h[VEC], d[VEC];
  load_as_float<T, VEC>(dst, h);
  load_floats<VEC>(delta + r * D + d0, d);
#pragma unroll
  for (int k = 0; k < VEC; ++k) h[k] += d[k];
  store_from_float<T, VEC>(dst, h);
}

// ---------------------------------------------------------------------------------------------
// Launch helpers.

int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();  // clear; a default is good enough for a launch heuristic
    return 108;
  }
  return sms;
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0; }

// The widest vector (in elements, at most 16 bytes) whose loads stay aligned for hidden's layout.
template <typename T>
int gather_vec(const void* hidden, int64_t D, int64_t sB, int64_t sT, int64_t sD) {
  if (sD != 1) return 1;
  for (int vec = static_cast<int>(16 / sizeof(T)); vec > 1; vec /= 2) {
    if (D % vec == 0 && sB % vec == 0 && sT % vec == 0 && aligned(hidden, vec * static_cast<int64_t>(sizeof(T))))
      return vec;
  }
  return 1;
}

template <typename T, int VEC>
cudaError_t launch_gather_vec(const T* hidden, int64_t T_len, int64_t D, int64_t sB, int64_t sT, int64_t sD,
                              const int64_t* positions, int64_t P, const int64_t* row_ptr, const int64_t* row_idx,
                              const float* weights, int64_t S, float* out, int64_t B, cudaStream_t stream) {
  const int64_t tiles = (D + 32 * VEC - 1) / (32 * VEC);
  if (tiles > 65535) return cudaErrorInvalidConfiguration;
  // More warps per block when blocks are few (few segments, many rows each), fewer otherwise.
  const int64_t blocks = S * tiles;
  const int64_t rows_per_segment = (B + S - 1) / S;
  int ny = blocks >= 2 * static_cast<int64_t>(sm_count()) ? 4 : kMaxGatherWarps;
  while (ny > 1 && static_cast<int64_t>(ny / 2) * kUnroll >= rows_per_segment) ny /= 2;
  const dim3 grid(static_cast<unsigned>(S), static_cast<unsigned>(tiles));
  const dim3 block(32, ny);
  const size_t smem = static_cast<size_t>(ny - 1) * VEC * 32 * sizeof(float);
  gather_segment_mean_kernel<T, VEC><<<grid, block, smem, stream>>>(hidden, T_len, D, sB, sT, sD, positions, P,
                                                                    row_ptr, row_idx, weights, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_gather_typed(const void* hidden_, int64_t B, int64_t T_len, int64_t D, int64_t sB, int64_t sT,
                                int64_t sD, const int64_t* positions, int64_t P, const int64_t* row_ptr,
                                const int64_t* row_idx, const float* weights, int64_t S, float* out,
                                cudaStream_t stream) {
  const T* hidden = static_cast<const T*>(hidden_);
  const int vec = gather_vec<T>(hidden_, D, sB, sT, sD);
  switch (vec) {
    case 8:
      if constexpr (sizeof(T) <= 2)
        return launch_gather_vec<T, 8>(hidden, T_len, D, sB, sT, sD, positions, P, row_ptr, row_idx, weights, S, out, B, stream);
      break;
    case 4:
      if constexpr (sizeof(T) <= 4)
        return launch_gather_vec<T, 4>(hidden, T_len, D, sB, sT, sD, positions, P, row_ptr, row_idx, weights, S, out, B, stream);
      break;
    case 2:
      return launch_gather_vec<T, 2>(hidden, T_len, D, sB, sT, sD, positions, P, row_ptr, row_idx, weights, S, out, B, stream);
    default:
      break;
  }
  return launch_gather_vec<T, 1>(hidden, T_len, D, sB, sT, sD, positions, P, row_ptr, row_idx, weights, S, out, B, stream);
}

template <typename T, int VEC>
cudaError_t launch_add_vec(T* out, int64_t B, int64_t T_len, int64_t D, const int64_t* positions,
                           const int64_t* row_to_request, const float* delta, int64_t N, cudaStream_t stream) {
  const int64_t tiles = (D + kAddThreads * VEC - 1) / (kAddThreads * VEC);
  if (tiles > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(tiles));
  add_at_positions_kernel<T, VEC><<<grid, kAddThreads, 0, stream>>>(out, T_len, D, positions, row_to_request, delta, N);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_add_typed(void* out_, int64_t B, int64_t T_len, int64_t D, const int64_t* positions,
                             const int64_t* row_to_request, const float* delta, int64_t N, cudaStream_t stream) {
  T* out = static_cast<T*>(out_);
  int vec = 1;
  for (int v = static_cast<int>(16 / sizeof(T)); v > 1; v /= 2) {
    if (D % v == 0 && aligned(out_, v * static_cast<int64_t>(sizeof(T))) &&
        aligned(delta, (v * 4 < 16 ? v * 4 : 16))) {
      vec = v;
      break;
    }
  }
  switch (vec) {
    case 8:
      if constexpr (sizeof(T) <= 2) return launch_add_vec<T, 8>(out, B, T_len, D, positions, row_to_request, delta, N, stream);
      break;
    case 4:
      if constexpr (sizeof(T) <= 4) return launch_add_vec<T, 4>(out, B, T_len, D, positions, row_to_request, delta, N, stream);
      break;
    case 2:
      return launch_add_vec<T, 2>(out, B, T_len, D, positions, row_to_request, delta, N, stream);
    default:
      break;
  }
  return launch_add_vec<T, 1>(out, B, T_len, D, positions, row_to_request, delta, N, stream);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public launchers (ops_cuda.h).

cudaError_t launch_build_segment_csr(const int64_t* segment_ids, int64_t B, int64_t n_segments, int64_t* row_ptr,
                                     int64_t* cursor, int64_t* row_idx, cudaStream_t stream) {
  if (n_segments < 0 || B < 0) return cudaErrorInvalidValue;
  if (B == 0 && n_segments == 0) return cudaMemsetAsync(row_ptr, 0, sizeof(int64_t), stream);
  build_segment_csr_kernel<<<1, kCsrThreads, 0, stream>>>(segment_ids, B, n_segments, row_ptr, cursor, row_idx);
  return cudaGetLastError();
}

cudaError_t launch_gather_segment_mean(const void* hidden, DType dtype, int64_t B, int64_t T, int64_t D, int64_t sB,
                                       int64_t sT, int64_t sD, const int64_t* positions, int64_t P,
                                       const int64_t* row_ptr, const int64_t* row_idx, const float* weights,
                                       int64_t n_segments, float* out, cudaStream_t stream) {
  if (B < 0 || T < 0 || D < 0 || P < 0 || n_segments < 0) return cudaErrorInvalidValue;
  if (n_segments == 0 || D == 0) return cudaSuccess;
  if (n_segments > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case DType::kFloat32:
      return launch_gather_typed<float>(hidden, B, T, D, sB, sT, sD, positions, P, row_ptr, row_idx, weights, n_segments, out, stream);
    case DType::kFloat16:
      return launch_gather_typed<__half>(hidden, B, T, D, sB, sT, sD, positions, P, row_ptr, row_idx, weights, n_segments, out, stream);
    case DType::kBFloat16:
      return launch_gather_typed<__nv_bfloat16>(hidden, B, T, D, sB, sT, sD, positions, P, row_ptr, row_idx, weights, n_segments, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_add_at_positions(void* out, DType dtype, int64_t B, int64_t T, int64_t D, const int64_t* positions,
                                    const int64_t* row_to_request, const float* delta, int64_t N,
                                    cudaStream_t stream) {
  if (B < 0 || T < 0 || D < 0 || N < 0) return cudaErrorInvalidValue;
  if (B == 0 || D == 0) return cudaSuccess;
  if (B > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case DType::kFloat32:
      return launch_add_typed<float>(out, B, T, D, positions, row_to_request, delta, N, stream);
    case DType::kFloat16:
      return launch_add_typed<__half>(out, B, T, D, positions, row_to_request, delta, N, stream);
    case DType::kBFloat16:
      return launch_add_typed<__nv_bfloat16>(out, B, T, D, positions, row_to_request, delta, N, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace alphaedit_fast
