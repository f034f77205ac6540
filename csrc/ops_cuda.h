// CUDA launchers of the hot ops of alphaedit_fast._C (see alphaedit_fast/ops/ref.py for the definitions).
//
// Plain C++ interface: raw device pointers, sizes, strides in elements, a dtype code and a stream.
// No torch headers here, so that csrc/ops_cuda.cu compiles standalone with nvcc; the torch::Tensor
// handling (checks, allocation, current stream) lives in csrc/ops.cpp under WITH_CUDA.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace alphaedit_fast {

// Element type of `hidden`; accumulations, `weights`, `delta` and the gather's `out` are fp32.
// (float64 stays on the CPU / PyTorch paths: the reference accumulates it in fp64.)
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Stable bucketing of rows by segment (CSR), on the device and without host synchronisation:
// row_ptr (n_segments + 1), cursor (n_segments) and row_idx (B) are device buffers written by the
// launcher; rows row_idx[row_ptr[s] .. row_ptr[s + 1]) are those of segment s, in increasing b.
// Out-of-range segment ids stop the kernel (device-side check).
cudaError_t launch_build_segment_csr(const int64_t* segment_ids, int64_t B, int64_t n_segments, int64_t* row_ptr,
                                     int64_t* cursor, int64_t* row_idx, cudaStream_t stream);

// out (n_segments, D) fp32, contiguous, fully written (segments without rows get zeros):
// out[s] = sum over the rows b of segment s, in CSR order, of weights[b] * mean_p hidden[b, positions[b, p], :].
// hidden is addressed with element strides (sB, sT, sD); positions is (B, P) contiguous int64, a negative
// position counts from the end (as in Python indexing); row_ptr/row_idx come from launch_build_segment_csr.
cudaError_t launch_gather_segment_mean(const void* hidden, DType dtype, int64_t B, int64_t T, int64_t D, int64_t sB,
                                       int64_t sT, int64_t sD, const int64_t* positions, int64_t P,
                                       const int64_t* row_ptr, const int64_t* row_idx, const float* weights,
                                       int64_t n_segments, float* out, cudaStream_t stream);

// In place on out (B, T, D), contiguous, already holding a copy of hidden:
// out[b, positions[b], :] = cast(float(out[b, positions[b], :]) + delta[row_to_request[b], :]);
// delta (N, D) fp32 contiguous. Out-of-range indices trigger a device-side assertion.
cudaError_t launch_add_at_positions(void* out, DType dtype, int64_t B, int64_t T, int64_t D,
                                    const int64_t* positions, const int64_t* row_to_request, const float* delta,
                                    int64_t N, cudaStream_t stream);

}  // namespace alphaedit_fast
