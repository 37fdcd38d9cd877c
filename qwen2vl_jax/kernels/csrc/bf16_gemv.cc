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
// over 256-wide blocks (a blocked order, like a BLAS), so results match a bf16 x bf16 -> f32 dot to fp32 rounding.
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
constexpr int64_t kBlock = 256;  // k per partial sum: each lane adds <= 32 products, then the block sums are added

// Weight streams per pass for MC activation rows: R * MC accumulators must stay in registers (16 on AVX2).
// 4 streams read as fast as 8 (bf16 decode shapes, alternating runs: 13.2-21.3 vs 13.3-20.5 GB/s).
template <int MC>
constexpr int kStreams = MC <= 2 ? 4 : 2;

// Rows [n0, n1) of w against x rows [m0, m0 + MC). The rows are read as R concurrent streams from R distant parts
// of the range (row n0 + r * S + i for stream r), where XLA's own fp32 gemv reads 8 adjacent rows: one
// sequential stream per core left the bf16 kernel at 12-16 GB/s where XLA's fp32 gemv reached 18-21; 8 adjacent
// rows did not help where a row is short (K = 1536: 8 rows are one 24 KB stream); 8 streams in different pages
// reach 16-19 (measured in the decode chain shapes, medians of 11 alternating runs: q 12.6 -> 18.6, gate
// 15.8 -> 19.3, down 14.3 -> 19.1, k 11.7 -> 15.8 GB/s). A sequential stream is prefetched one 4 KB page at a
// time; separate pages give the core several misses in flight.
//
// Summation order, the same for every (MC, R, chunk), so a row's result does not depend on its batch: lane j of
// an output's accumulator adds w[n, k] * x[m, k] for k = j mod 8 in increasing k within each 256-wide block; the
// block's 8 lanes are added (hsum) to the running sum in block order; the K % 8 tail is added last.
template <int MC, int R>
void gemv_streams(const float* x, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1,
                  int64_t m0) {
  const int64_t K8 = K - K % 8;
  const int64_t S = (n1 - n0) / R;  // rows per stream; the (n1 - n0) % R left over are done with R = 1
  const float* xb = x + m0 * K;
  for (int64_t i = 0; i < S; ++i) {
    const uint16_t* wr[R];
    for (int r = 0; r < R; ++r) wr[r] = w + (n0 + r * S + i) * K;
    float sum[R][MC] = {};
    for (int64_t k0 = 0; k0 < K8; k0 += kBlock) {
      const int64_t k1 = k0 + kBlock < K8 ? k0 + kBlock : K8;
      __m256 acc[R][MC];
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MC; ++m) acc[r][m] = _mm256_setzero_ps();
      for (int64_t k = k0; k < k1; k += 8) {
        __m256 xv[MC];
        for (int m = 0; m < MC; ++m) xv[m] = _mm256_loadu_ps(xb + m * K + k);
        for (int r = 0; r < R; ++r) {
          const __m256 wv = widen_bf16(wr[r] + k);
          for (int m = 0; m < MC; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MC; ++m) sum[r][m] += hsum(acc[r][m]);
    }
    for (int r = 0; r < R; ++r) {
      for (int m = 0; m < MC; ++m) {
        float s = sum[r][m];
        const float* xr = xb + m * K;
        for (int64_t k = K8; k < K; ++k) s += widen1(wr[r][k]) * xr[k];
        y[(m0 + m) * N + n0 + r * S + i] = s;
      }
    }
  }
  if (R > 1 && n0 + R * S < n1) gemv_streams<MC, 1>(x, w, y, K, N, n0 + R * S, n1, m0);
}

template <int MC>
void gemv_block(const float* x, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1,
                int64_t m0) {
  gemv_streams<MC, kStreams<MC>>(x, w, y, K, N, n0, n1, m0);
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
