// bf16 matrix-vector products for XLA:CPU on AVX2 machines (the decode step's dots).
//
// Why: without AVX512-BF16, XLA:CPU has no fast path for a dot with bf16 weights and one (or a few) activation
// rows: its library kernel emulates bf16 (~8 GB/s here) and the fallback materialises an fp32 copy of the weight
// on every call (~1 GB/s). A gemv is memory-bound, so the right kernel streams the bf16 weight once, widens it to
// fp32 in registers (a 16-bit shift: exact) and accumulates with FMA in fp32, like PyTorch's CPU bf16 kernels.
//
//   y[m, n] = sum_k x[m, k] * w[n, k]      x: f32[M, K], w: bf16[N, K] (PyTorch Linear layout), y: f32[M, N]
//
// Rows of w are split across XLA's intra-op thread pool. Products are exact in fp32; sums use 8-lane partials
// (a blocked order, like a BLAS), so results match a bf16 x bf16 -> f32 dot to fp32 rounding.
#include <immintrin.h>

#include <cstdint>
#include <memory>

#include "work_queue.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline __m256 widen_bf16(const uint16_t* p) {  // 8 bf16 -> 8 fp32 (exact)
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float widen1(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

constexpr int kMaxRows = 4;  // activation rows handled per pass over the weights (decode batches)

// Rows [n0, n1) of w against x rows [m0, m0 + MC): 32 weights per step, 4 independent FMA chains per row (the
// same chains for every MC, so a row's result does not depend on the batch it is in). MC is a compile-time
// constant so the 4 * MC accumulators can stay in registers (measured: 1 row unchanged at ~14 GB/s, 2-4 rows
// 13.0 / 11.4 / 10.7 GB/s).
template <int MC>
void gemv_block(const float* x, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1,
                int64_t m0) {
  const int64_t K32 = K - K % 32;
  const float* xb = x + m0 * K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    __m256 acc[MC][4];
    for (int m = 0; m < MC; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K32; k += 32) {
      for (int j = 0; j < 4; ++j) {
        const __m256 wj = widen_bf16(wr + k + 8 * j);
        for (int m = 0; m < MC; ++m) {
          acc[m][j] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(xb + m * K + k + 8 * j), acc[m][j]);
        }
      }
    }
    for (int m = 0; m < MC; ++m) {
      float s = hsum(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3])));
      const float* xr = xb + m * K;
      for (int64_t k = K32; k < K; ++k) s += widen1(wr[k]) * xr[k];
      y[(m0 + m) * N + n] = s;
    }
  }
}

void gemv_rows(const float* x, const uint16_t* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0,
               int64_t n1) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    switch (M - m0 < kMaxRows ? M - m0 : kMaxRows) {
      case 1: gemv_block<1>(x, w, y, K, N, n0, n1, m0); break;
      case 2: gemv_block<2>(x, w, y, K, N, n0, n1, m0); break;
      case 3: gemv_block<3>(x, w, y, K, N, n0, n1, m0); break;
      default: gemv_block<4>(x, w, y, K, N, n0, n1, m0); break;
    }
  }
}

struct Job {
  const float* x;
  const uint16_t* w;
  float* y;
  int64_t M, K, N, rows_per_chunk;
  qwen2vl_jax::WorkQueue queue;  // one item per chunk of weight rows

  void work() {
    queue.drain([&](int64_t c) {
      const int64_t n0 = c * rows_per_chunk, n1 = n0 + rows_per_chunk < N ? n0 + rows_per_chunk : N;
      gemv_rows(x, w, y, M, K, N, n0, n1);
    });
  }
};

ffi::Error Bf16GemvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("bf16_gemv expects x[M, K] and w[N, K]");
  }
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->w = reinterpret_cast<const uint16_t*>(w.typed_data());
  job->y = y->typed_data();
  job->M = xd[0], job->K = xd[1], job->N = wd[0];

  // Rows go out in chunks (multiples of 8, ~4 per worker for balance) through the shared work queue. The calling
  // thread works too, so it schedules num_threads() - 1 tasks: one worker per core. One more worker than cores
  // (the first version) lost 10-14% of the bandwidth here (measured A/B, 197-call decode chain: 15.0-17.2 vs
  // 16.9-17.8 GB/s median): a worker descheduled mid-chunk holds up the end of every call.
  int64_t threads = pool.num_threads() - 1;
  if (threads < 1 || job->N < 64 * threads) threads = 0;
  const int64_t chunks_wanted = 4 * (threads + 1);
  job->rows_per_chunk = ((job->N + chunks_wanted - 1) / chunks_wanted + 7) / 8 * 8;
  job->queue.count = (job->N + job->rows_per_chunk - 1) / job->rows_per_chunk;
  qwen2vl_jax::run_on_pool(pool, job, threads);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Bf16Gemv, Bf16GemvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
