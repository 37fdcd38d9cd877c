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

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>

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

constexpr int kMaxRows = 8;  // activation rows handled per pass over the weights (decode batches)

// Rows [n0, n1) of w against x rows [m0, m0 + mc): 32 weights per step, 4 independent FMA chains per row.
void gemv_block(const float* x, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1,
                int64_t m0, int64_t mc) {
  const int64_t K32 = K - K % 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    __m256 acc[kMaxRows][4];
    for (int64_t m = 0; m < mc; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K32; k += 32) {
      const __m256 w0 = widen_bf16(wr + k), w1 = widen_bf16(wr + k + 8);
      const __m256 w2 = widen_bf16(wr + k + 16), w3 = widen_bf16(wr + k + 24);
      for (int64_t m = 0; m < mc; ++m) {
        const float* xr = x + (m0 + m) * K + k;
        acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[m][1]);
        acc[m][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[m][2]);
        acc[m][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[m][3]);
      }
    }
    for (int64_t m = 0; m < mc; ++m) {
      float s = hsum(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3])));
      const float* xr = x + (m0 + m) * K;
      for (int64_t k = K32; k < K; ++k) s += widen1(wr[k]) * xr[k];
      y[(m0 + m) * N + n] = s;
    }
  }
}

void gemv_rows(const float* x, const uint16_t* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0,
               int64_t n1) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int64_t mc = M - m0 < kMaxRows ? M - m0 : kMaxRows;
    gemv_block(x, w, y, K, N, n0, n1, m0, mc);
  }
}

ffi::Error Bf16GemvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("bf16_gemv expects x[M, K] and w[N, K]");
  }
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  const float* xp = x.typed_data();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* yp = y->typed_data();

  // As many chunks as pool threads (one per core), this thread taking the first; rows in multiples of 8.
  int64_t parts = pool.num_threads();
  if (parts < 1) parts = 1;
  if (N < 64 * parts) parts = 1;
  const int64_t step = ((N + parts - 1) / parts + 7) / 8 * 8;
  std::atomic<int64_t> remaining{parts - 1};
  std::mutex mu;
  std::condition_variable cv;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t n0 = p * step, n1 = (p + 1) * step < N ? (p + 1) * step : N;
    pool.Schedule([=, &remaining, &mu, &cv] {
      if (n0 < n1) gemv_rows(xp, wp, yp, M, K, N, n0, n1);
      if (remaining.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_one();
      }
    });
  }
  gemv_rows(xp, wp, yp, M, K, N, 0, step < N ? step : N);
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return remaining.load() == 0; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Bf16Gemv, Bf16GemvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
