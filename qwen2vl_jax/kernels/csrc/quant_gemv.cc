// int8 / int4 weight-only matrix-vector products for XLA:CPU on AVX2 machines (the decode step's dots over
// quantized weights): bf16_gemv.cc's sibling.
//
// Why: a decode step streams every weight once, so its time is the weight bytes over the memory bandwidth; int8
// halves bf16's bytes and int4 (with its scales) nearly quarters them, but only if the dot reads the integers as
// they are stored. XLA's formulation (`layers.quantized_dense`'s reference) first converts the integers to a float
// copy of the weight (written and read again every call), and int4's grouped dot_general is a batched product over
// 128-column groups that XLA:CPU runs far from the bandwidth. Here the integers are read once and widened to fp32
// in registers (exact), products are accumulated with FMA in fp32, and the scales multiply fp32 partial sums: the
// arithmetic of `quantization/formats.py`'s `dequantize(q, scale)` moved past the dot, as in the reference.
//
//   int8 per output channel:   y[m, n] = (sum_k x[m, k] q[n, k]) * scale[n]
//       x: f32[M, K]   q: s8[N, K]   scale: f32[N]   y: f32[M, N]
//   int4 in G groups of g = K / G columns (g a multiple of 16), two per byte, low nibble first (column 2p in the
//   low nibble of byte p, 2p + 1 in the high one), values in [-8, 7]:
//                              y[m, n] = sum_G scale[n, G] * (sum_{k in G} x[m, k] q[n, k])
//       x: f32[M, K]   q: u8[N, K / 2]   scale: f32[N, G]   y: f32[M, N]
//
// Dispatch and memory layout follow bf16_gemv.cc (measured there): up to 4 activation rows per pass over the
// weights, rows of q split over XLA's intra-op pool in chunks through the shared work queue (one worker per core),
// each worker reading its chunk as several concurrent row streams from distant pages.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "avx2_math.h"
#include "work_queue.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using qwen2vl_jax::hsum;

constexpr int kMaxRows = 4;      // activation rows per pass over the weights (decode batches), as in bf16_gemv.cc
constexpr int64_t kBlock = 256;  // int8: k per partial sum (each lane adds <= 32 products), as in bf16_gemv.cc

// Weight streams per pass for MC activation rows: R * MC accumulators must stay in registers (16 on AVX2).
template <int MC>
constexpr int kStreams = MC <= 2 ? 4 : 2;

// Software prefetch of each stream, this many bytes ahead. Unlike the bf16 kernel (memory-bound: prefetching did
// not help it), widening integers costs more instructions per byte, and the prefetches keep the misses in flight
// while the core computes. One thread over 0.8-1.2 GB of weights (rows of 1536 columns), alternating runs on a
// loaded machine: int8 7.3-8.0 -> 9.5-14.1 GB/s (5 rounds); int4 8.3-8.6 -> 9.1-9.4 (11 rounds; the table-lookup
// widening of an earlier version); 512 and 2048 bytes ahead were within the noise of 1024.
constexpr int64_t kPrefetch = 1024;

// ------------------------------------------------------------------------------------------------------ int8
inline __m256 widen_int8(const int8_t* p) {  // 8 int8 -> 8 fp32 (exact)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Rows [n0, n1) of q against x rows [m0, m0 + MC), read as R concurrent streams (row n0 + r * S + i for stream
// r), exactly as bf16_gemv.cc's gemv_streams.
//
// Summation order, the same for every (MC, R, chunk), so a row's result does not depend on its batch: lane j of
// an output's accumulator adds q[n, k] * x[m, k] for k = j mod 8 in increasing k within each 256-wide block; the
// block's 8 lanes are added (hsum) to the running sum in block order; the K % 8 tail is added last (one k at a
// time); the sum is multiplied by scale[n]. (bf16_gemv.cc's order, then the scale.)
template <int MC, int R>
void int8_streams(const float* x, const int8_t* q, const float* scale, float* y, int64_t K, int64_t N, int64_t n0,
                  int64_t n1, int64_t m0) {
  const int64_t K8 = K - K % 8;
  const int64_t S = (n1 - n0) / R;  // rows per stream; the (n1 - n0) % R left over are done with R = 1
  const float* xb = x + m0 * K;
  for (int64_t i = 0; i < S; ++i) {
    const int8_t* qr[R];
    for (int r = 0; r < R; ++r) qr[r] = q + (n0 + r * S + i) * K;
    float sum[R][MC] = {};
    for (int64_t k0 = 0; k0 < K8; k0 += kBlock) {
      const int64_t k1 = k0 + kBlock < K8 ? k0 + kBlock : K8;
      __m256 acc[R][MC];
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MC; ++m) acc[r][m] = _mm256_setzero_ps();
      for (int64_t k = k0; k < k1; k += 8) {
        __m256 xv[MC];
        for (int m = 0; m < MC; ++m) xv[m] = _mm256_loadu_ps(xb + m * K + k);
        if ((k & 63) == 0)
          for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(qr[r] + k + kPrefetch), _MM_HINT_T0);
        for (int r = 0; r < R; ++r) {
          const __m256 wv = widen_int8(qr[r] + k);
          for (int m = 0; m < MC; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MC; ++m) sum[r][m] += hsum(acc[r][m]);
    }
    for (int r = 0; r < R; ++r) {
      const int64_t n = n0 + r * S + i;
      for (int m = 0; m < MC; ++m) {
        float s = sum[r][m];
        const float* xr = xb + m * K;
        for (int64_t k = K8; k < K; ++k) s = std::fma(static_cast<float>(qr[r][k]), xr[k], s);
        y[(m0 + m) * N + n] = s * scale[n];
      }
    }
  }
  if (R > 1 && n0 + R * S < n1) int8_streams<MC, 1>(x, q, scale, y, K, N, n0 + R * S, n1, m0);
}

// ------------------------------------------------------------------------------------------------------ int4
constexpr float kNibbleScale = 1.0f / (1 << 28);  // the widened nibbles are n * 2^28 (widen_int4)

// 8 packed bytes (16 columns) -> their 8 low nibbles (the even columns) and their 8 high nibbles (the odd columns)
// as fp32, each times 2^28: the byte zero-extended to 32 bits and shifted left by 28 (by 24, then the 4 bits under
// the high nibble cleared) leaves the nibble in the lane's top 4 bits, where the sign bit makes it 4-bit two's
// complement; n * 2^28 converts to fp32 exactly. 3 integer instructions per 16 columns, where shifting back down
// (srai by 28: the integers themselves) costs 4 and a table lookup on bytes (vpshufb, then vpmovsxbd per 8) ~4.5.
// The int4 loop is bound by instructions, not by memory (2 conversions + 2 FMAs per 16 columns on the two FMA
// ports are its floor on AVX2). One thread, 1536-column rows, alternating runs: 11.2 GB/s of packed weights from
// L2 and 10.2-10.3 from DRAM (prefetched), against 10.4 / 9.4-9.6 for the table lookup and ~8.7 (L1) for the shifts
// back; the int8 loop reaches ~24 from L2, bf16_gemv.cc's ~35, and one thread reads ~12.5 GB/s of bf16 from DRAM.
inline void widen_int4(const uint8_t* p, __m256& even, __m256& odd) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  even = _mm256_cvtepi32_ps(_mm256_slli_epi32(v, 28));
  odd = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_slli_epi32(v, 24), _mm256_set1_epi32(0xF0000000u)));
}

// Rows [n0, n1) of q against x rows [m0, m0 + MC), R concurrent streams as int8_streams. `xd` is x with each
// 16-column block de-interleaved (its 8 even columns, then its 8 odd ones: `prepare_x`), so the 8 low and the 8
// high nibbles of 8 bytes meet their columns in one 8-lane load each.
//
// Summation order, the same for every (MC, R, chunk): per group, lane j of an output's accumulator adds, for each
// 16-column block k0 of the group in increasing order, q[n, k0 + 2j] * x[m, k0 + 2j] and then
// q[n, k0 + 2j + 1] * x[m, k0 + 2j + 1]; the group's 8 lanes, times unscale[m], are scaled by scale[n, G] into the
// output's 8 running lanes (one FMA per lane: run = (acc * unscale) * scale + run), group after group; the 8 running
// lanes are added at the end (hsum).
//
// The 2^28 in the widened nibbles changes no bit: a power of two commutes with fp32 rounding while every value
// stays in the normal range, so the accumulator holds exactly 2^28 x the sum of the unscaled products (same
// significand, exponent + 28) and unscale[m] = 2^-28 takes it back exactly. Scaled up, the sums can only leave the
// range by overflowing (unscaled partial sums of 2^100; the unscaled order would meet subnormals first, below
// 2^-126); where a row's activations could reach that (prepare_x), its de-interleaved copy is scaled by 2^-28
// instead and unscale[m] = 1.
template <int MC, int R>
void int4_streams(const float* xd, const float* unscale, const uint8_t* q, const float* scale, float* y, int64_t K,
                  int64_t G, int64_t N, int64_t n0, int64_t n1, int64_t m0) {
  const int64_t P = K / 2, gk = K / G;  // bytes per row, columns per group
  const int64_t S = (n1 - n0) / R;
  const float* xb = xd + m0 * K;
  __m256 back[MC];
  for (int m = 0; m < MC; ++m) back[m] = _mm256_set1_ps(unscale[m0 + m]);
  for (int64_t i = 0; i < S; ++i) {
    const uint8_t* qr[R];
    const float* sr[R];
    for (int r = 0; r < R; ++r) {
      qr[r] = q + (n0 + r * S + i) * P;
      sr[r] = scale + (n0 + r * S + i) * G;
    }
    __m256 run[R][MC];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MC; ++m) run[r][m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m256 acc[R][MC];
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MC; ++m) acc[r][m] = _mm256_setzero_ps();
      for (int64_t k0 = g * gk; k0 < (g + 1) * gk; k0 += 128) {  // a 64-byte line per stream
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(qr[r] + (k0 >> 1) + kPrefetch), _MM_HINT_T0);
        const int64_t k1 = k0 + 128 < (g + 1) * gk ? k0 + 128 : (g + 1) * gk;
        for (int64_t k = k0; k < k1; k += 16) {
          __m256 xe[MC], xo[MC];
          for (int m = 0; m < MC; ++m) {
            xe[m] = _mm256_loadu_ps(xb + m * K + k);
            xo[m] = _mm256_loadu_ps(xb + m * K + k + 8);
          }
          for (int r = 0; r < R; ++r) {
            __m256 even, odd;
            widen_int4(qr[r] + (k >> 1), even, odd);
            for (int m = 0; m < MC; ++m) {
              acc[r][m] = _mm256_fmadd_ps(even, xe[m], acc[r][m]);
              acc[r][m] = _mm256_fmadd_ps(odd, xo[m], acc[r][m]);
            }
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m256 s = _mm256_broadcast_ss(sr[r] + g);
        for (int m = 0; m < MC; ++m) run[r][m] = _mm256_fmadd_ps(_mm256_mul_ps(acc[r][m], back[m]), s, run[r][m]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MC; ++m) y[(m0 + m) * N + n0 + r * S + i] = hsum(run[r][m]);
  }
  if (R > 1 && n0 + R * S < n1) int4_streams<MC, 1>(xd, unscale, q, scale, y, K, G, N, n0 + R * S, n1, m0);
}

// x[M, K] -> `xd`: each 16-column block as its 8 even columns then its 8 odd ones (K a multiple of 16), and
// `unscale[m]`, what undoes the nibbles' 2^28 for row m. A row whose largest |x| reaches 2^99 / (8 g) (g columns
// per group) could push a group's partial sums times 2^28 past fp32's largest value (|q| <= 8): its copy is scaled
// by 2^-28 here instead (exact for |x| >= 2^-98; smaller entries round as subnormals, 2^-180 below the row's
// largest) and unscale[m] = 1. Per row, so a row's numbers never depend on the other rows of its batch.
void prepare_x(const float* x, int64_t M, int64_t K, int64_t gk, std::vector<float>& xd,
               std::vector<float>& unscale) {
  xd.resize(M * K);
  unscale.resize(M);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float* xdr = xd.data() + m * K;
    float amax = 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += 16)
      for (int j = 0; j < 8; ++j) {
        xdr[k0 + j] = xr[k0 + 2 * j];
        xdr[k0 + 8 + j] = xr[k0 + 2 * j + 1];
        amax = std::fmax(amax, std::fmax(std::fabs(xr[k0 + 2 * j]), std::fabs(xr[k0 + 2 * j + 1])));
      }
    const bool large = !(static_cast<double>(amax) * 8.0 * static_cast<double>(gk) < std::ldexp(1.0, 99));
    unscale[m] = large ? 1.0f : kNibbleScale;
    if (large)
      for (int64_t k = 0; k < K; ++k) xdr[k] *= kNibbleScale;
  }
}

// ------------------------------------------------------------------------------------------------- dispatch
// One pass per group of up to kMaxRows activation rows over weight rows [n0, n1).
struct Int8Rows {
  const float* x;
  const int8_t* q;
  const float* scale;
  float* y;
  int64_t K, N;
  template <int MC>
  void run(int64_t n0, int64_t n1, int64_t m0) const {
    int8_streams<MC, kStreams<MC>>(x, q, scale, y, K, N, n0, n1, m0);
  }
};

struct Int4Rows {
  const float* xd;  // de-interleaved x (prepare_x)
  const float* unscale;
  const uint8_t* q;
  const float* scale;
  float* y;
  int64_t K, G, N;
  template <int MC>
  void run(int64_t n0, int64_t n1, int64_t m0) const {
    int4_streams<MC, kStreams<MC>>(xd, unscale, q, scale, y, K, G, N, n0, n1, m0);
  }
};

template <class Rows>
struct Job {
  Rows rows;
  int64_t M, N, rows_per_chunk;
  std::vector<float> xd, unscale;  // int4's prepared x, owned by the job (pool tasks may outlive the call's frame)
  qwen2vl_jax::WorkQueue queue;  // one item per chunk of weight rows

  void work() {
    queue.drain([&](int64_t c) {
      const int64_t n0 = c * rows_per_chunk, n1 = n0 + rows_per_chunk < N ? n0 + rows_per_chunk : N;
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        switch (M - m0 < kMaxRows ? M - m0 : kMaxRows) {
          case 1: rows.template run<1>(n0, n1, m0); break;
          case 2: rows.template run<2>(n0, n1, m0); break;
          case 3: rows.template run<3>(n0, n1, m0); break;
          default: rows.template run<4>(n0, n1, m0); break;
        }
      }
    });
  }
};

// bf16_gemv.cc's split: chunks of a multiple of 8 rows, ~4 per worker; the calling thread works too, so
// num_threads() - 1 pool tasks (one worker per core); no pool below 64 rows per worker.
template <class Rows>
void run_job(ffi::ThreadPool& pool, const std::shared_ptr<Job<Rows>>& job) {
  int64_t threads = pool.num_threads() - 1;
  if (threads < 1 || job->N < 64 * threads) threads = 0;
  const int64_t chunks_wanted = 4 * (threads + 1);
  job->rows_per_chunk = ((job->N + chunks_wanted - 1) / chunks_wanted + 7) / 8 * 8;
  job->queue.count = (job->N + job->rows_per_chunk - 1) / job->rows_per_chunk;
  qwen2vl_jax::run_on_pool(pool, job, threads);
}

ffi::Error Int8GemvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                        ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || qd.size() != 2 || sd.size() != 1 || xd[1] != qd[1] || sd[0] != qd[0]) {
    return ffi::Error::InvalidArgument("int8_gemv expects x[M, K], q[N, K] and scale[N]");
  }
  auto job = std::make_shared<Job<Int8Rows>>();
  job->M = xd[0], job->N = qd[0];
  job->rows = Int8Rows{x.typed_data(), q.typed_data(), scale.typed_data(), y->typed_data(), xd[1], qd[0]};
  run_job(pool, job);
  return ffi::Error::Success();
}

ffi::Error Int4GemvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q,
                        ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || qd.size() != 2 || sd.size() != 2 || xd[1] != 2 * qd[1] || sd[0] != qd[0]) {
    return ffi::Error::InvalidArgument("int4_gemv expects x[M, K], q[N, K / 2] and scale[N, G]");
  }
  const int64_t K = xd[1], G = sd[1];
  if (G < 1 || K % G != 0 || (K / G) % 16 != 0) {
    return ffi::Error::InvalidArgument("int4_gemv needs K / G columns per group, a multiple of 16");
  }
  auto job = std::make_shared<Job<Int4Rows>>();
  job->M = xd[0], job->N = qd[0];
  prepare_x(x.typed_data(), xd[0], K, K / G, job->xd, job->unscale);
  job->rows = Int4Rows{job->xd.data(), job->unscale.data(), q.typed_data(), scale.typed_data(), y->typed_data(), K, G,
                       qd[0]};
  run_job(pool, job);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Int8Gemv, Int8GemvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Int4Gemv, Int4GemvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
