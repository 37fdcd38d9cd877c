// Fused block-diagonal softmax attention for XLA:CPU on AVX2 machines (the vision tower's attention).
//
// Why: the vision tower attends within each image / video frame ("segment"), 16 heads of 80 dims over 1024
// (448x448) to 4096 (896x896) patches. Written as XLA ops, the [heads, queries, keys] scores make several trips
// through memory (dot, max, exp-sum, normalise, dot) and the head-dim-80 dots run at 35-57 GFLOP/s here; that was
// about a third of the vision encoder's time. This kernel is the flash-attention recipe: a block of queries meets
// the keys block by block, the scores stay in cache, and the softmax is computed online (running max and sum,
// Milakov & Gimelshein 2018; Dao et al. 2022), all in fp32.
//
//   o[n, p, :] = sum_j softmax_j(q[n, p, :] . k[n, j, :] * scale) v[n, j, :],   j in the segment holding p
//
//   q, k, v: f32[N, P, H] (head-major: each head's rows contiguous, so keys stream without TLB misses)
//   segments: i32[S, 2] = (first row, length); a length of 0 is a padded segment
//   o:       f32[N, P, H]    rows that no segment covers are 0
//
// Work units are (segment, head, block of kBQ queries), taken from a shared counter by the calling thread and by
// XLA's intra-op pool (work_queue.h, shared with bf16_gemv.cc: the caller never waits on queued tasks, so concurrent
// calls cannot deadlock the pool). Scores use 6x16 register tiles, the probability-value product 4x24 ones (12
// accumulators each), one FMA chain per output element within a key block.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "work_queue.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kBQ = 48;    // queries per work unit: 6 vectors of 8 lanes (a multiple of 16 and of 24)
constexpr int kBK = 128;   // keys per block: the [kBK, kBQ] score tile (24 KB) stays in L1 (best of 64-512 here)

// exp(x) for 8 lanes: Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial), ~1 ulp over the
// range that matters here (x <= 0 after subtracting the row max); below -87.3 (and -inf) it returns 0.
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  x = _mm256_min_ps(x, _mm256_set1_ps(88.37626f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// c[MR][NV*8] (row stride ldc) = sum_k a(r, k) * b[k][:]   with a(r, k) = a[r * ars + k * aks], b row stride ldb.
// Element (r, k) of `a` is broadcast, so `a` can be read in place with any strides: the keys straight from k
// (scores^T = K . Q^T) and v transposed straight from v (out^T = V^T . P^T). One FMA chain per output element.
template <int MR, int NV>
inline void tile(const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb, int64_t K, float* c,
                 int64_t ldc) {
  __m256 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(b + k * ldb + 8 * v);
    for (int r = 0; r < MR; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a + r * ars + k * aks);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(ar, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + r * ldc + 8 * v, acc[r][v]);
}

// scores^T rows [0, rows) x kBQ columns: 6-row tiles (12 accumulators), then the 1-5 rows left.
template <int MR>
inline void score_rows(const float* k, int64_t row, const float* QT, int64_t H, float* ST) {
  for (int c = 0; c < kBQ; c += 16) tile<MR, 2>(k, row, 1, QT + c, kBQ, H, ST + c, kBQ);
}

inline void scores(const float* k, int64_t row, const float* QT, int64_t H, int64_t rows, float* ST) {
  int64_t j = 0;
  for (; j + 6 <= rows; j += 6) score_rows<6>(k + j * row, row, QT, H, ST + j * kBQ);
  switch (rows - j) {
    case 1: score_rows<1>(k + j * row, row, QT, H, ST + j * kBQ); break;
    case 2: score_rows<2>(k + j * row, row, QT, H, ST + j * kBQ); break;
    case 3: score_rows<3>(k + j * row, row, QT, H, ST + j * kBQ); break;
    case 4: score_rows<4>(k + j * row, row, QT, H, ST + j * kBQ); break;
    case 5: score_rows<5>(k + j * row, row, QT, H, ST + j * kBQ); break;
    default: break;
  }
}

struct Job {
  const float *q, *k, *v;
  float* o;
  const int32_t* seg;
  int64_t P, N, H, S;
  float scale;
  std::vector<int64_t> unit_start;  // first unit of each (segment, head)
  qwen2vl_jax::WorkQueue queue;     // one item per unit

  void run_unit(int64_t u, std::vector<float>& buf) const;

  void work() {
    std::vector<float> buf;  // per-thread scratch, reused across units
    queue.drain([&](int64_t u) { run_unit(u, buf); });
  }
};

// One block of kBQ queries of one head of one segment, in the transposed layout (queries along the vector lanes):
// every softmax reduction then runs down columns, lane-parallel, with no horizontal sums.
void Job::run_unit(int64_t u, std::vector<float>& buf) const {
  const int64_t sh = std::upper_bound(unit_start.begin(), unit_start.end(), u) - unit_start.begin() - 1;
  const int64_t s = sh / N, n = sh % N, qb = u - unit_start[sh];
  const int64_t first = seg[2 * s], L = seg[2 * s + 1];
  const int64_t q0 = qb * kBQ, nq = std::min<int64_t>(kBQ, L - q0);
  const int64_t row = H;  // head-major: row j of head n at (n * P + j) * H
  const float* kh = k + (n * P + first) * H;  // key j, dim h at kh[j * H + h]
  const float* vh = v + (n * P + first) * H;

  buf.resize(H * kBQ + kBK * kBQ + 2 * H * kBQ + 2 * kBQ);
  float* QT = buf.data();       // [H][kBQ]: scaled queries, transposed (padded queries are 0)
  float* ST = QT + H * kBQ;     // [kBK][kBQ]: scores^T, then probabilities^T
  float* OT = ST + kBK * kBQ;   // [H][kBQ]: unnormalised output^T
  float* BT = OT + H * kBQ;     // [H][kBQ]: this key block's contribution
  float* m = BT + H * kBQ;      // [kBQ] running max per query
  float* l = m + kBQ;           // [kBQ] running sum per query

  for (int64_t i = 0; i < kBQ; ++i) {
    const float* src = q + (n * P + first + q0 + i) * H;
    for (int64_t h = 0; h < H; ++h) QT[h * kBQ + i] = i < nq ? src[h] * scale : 0.0f;
    m[i] = -INFINITY;
    l[i] = 0.0f;
  }
  std::memset(OT, 0, sizeof(float) * H * kBQ);

  for (int64_t k0 = 0; k0 < L; k0 += kBK) {
    const int64_t nk = std::min<int64_t>(kBK, L - k0);
    scores(kh + k0 * row, row, QT, H, nk, ST);
    alignas(32) float alpha[kBQ];  // how much the earlier blocks' sums shrink under the new running max
    for (int c = 0; c < kBQ; c += 8) {  // online softmax, 8 queries per lane group
      __m256 mx = _mm256_loadu_ps(m + c);
      for (int64_t j = 0; j < nk; ++j) mx = _mm256_max_ps(mx, _mm256_loadu_ps(ST + j * kBQ + c));
      __m256 sum = _mm256_setzero_ps();
      for (int64_t j = 0; j < nk; ++j) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(ST + j * kBQ + c), mx));
        _mm256_storeu_ps(ST + j * kBQ + c, e);
        sum = _mm256_add_ps(sum, e);
      }
      const __m256 a = exp256(_mm256_sub_ps(_mm256_loadu_ps(m + c), mx));  // 0 on the first block (m = -inf)
      _mm256_storeu_ps(l + c, _mm256_fmadd_ps(_mm256_loadu_ps(l + c), a, sum));
      _mm256_storeu_ps(m + c, mx);
      _mm256_store_ps(alpha + c, a);
    }
    // out^T block = V^T . P^T: rows = head dims (4 at a time), 24 queries per tile, K = the block's keys
    for (int64_t h = 0; h < H; h += 4)
      for (int c = 0; c < kBQ; c += 24) tile<4, 3>(vh + k0 * row + h, 1, row, ST + c, kBQ, nk, BT + h * kBQ + c, kBQ);
    for (int64_t h = 0; h < H; ++h)
      for (int c = 0; c < kBQ; c += 8) {
        float* op = OT + h * kBQ + c;
        _mm256_storeu_ps(op, _mm256_fmadd_ps(_mm256_loadu_ps(op), _mm256_loadu_ps(alpha + c),
                                             _mm256_loadu_ps(BT + h * kBQ + c)));
      }
  }
  for (int64_t i = 0; i < nq; ++i) {
    float* dst = o + (n * P + first + q0 + i) * H;
    const float inv = 1.0f / l[i];
    for (int64_t h = 0; h < H; ++h) dst[h] = OT[h * kBQ + i] * inv;
  }
}

ffi::Error SegmentAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::ResultBuffer<ffi::F32> o,
                                float scale) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), sd = seg.dimensions();
  bool same = qd.size() == 3 && kd.size() == 3 && vd.size() == 3;
  for (size_t i = 0; same && i < 3; ++i) same = kd[i] == qd[i] && vd[i] == qd[i];
  if (!same || sd.size() != 2 || sd[1] != 2) {
    return ffi::Error::InvalidArgument("segment_attention expects q, k, v f32[N, P, H] and segments i32[S, 2]");
  }
  auto job = std::make_shared<Job>();
  job->q = q.typed_data(), job->k = k.typed_data(), job->v = v.typed_data(), job->o = o->typed_data();
  job->seg = seg.typed_data();
  job->N = qd[0], job->P = qd[1], job->H = qd[2], job->S = sd[0], job->scale = scale;
  if (job->H % 8 != 0) return ffi::Error::InvalidArgument("segment_attention needs a head dim multiple of 8");
  for (int64_t s = 0; s < job->S; ++s) {
    const int64_t first = job->seg[2 * s], len = job->seg[2 * s + 1];
    if (len < 0 || first < 0 || first + len > job->P) {
      return ffi::Error::InvalidArgument("segment_attention: a segment lies outside the rows");
    }
  }
  std::memset(job->o, 0, sizeof(float) * job->P * job->N * job->H);  // rows outside every segment
  job->unit_start.reserve(job->S * job->N + 1);
  int64_t units = 0;
  for (int64_t s = 0; s < job->S; ++s) {
    const int64_t blocks = (job->seg[2 * s + 1] + kBQ - 1) / kBQ;
    for (int64_t n = 0; n < job->N; ++n) {
      job->unit_start.push_back(units);
      units += blocks;
    }
  }
  if (units == 0) return ffi::Error::Success();
  job->unit_start.push_back(units);  // sentinel: upper_bound never runs past the last real entry
  job->queue.count = units;
  // Compute-bound: num_threads() or num_threads() - 1 pool tasks measured the same here (the gemv, which is
  // bandwidth-bound, needs exactly one worker per core).
  qwen2vl_jax::run_on_pool(pool, job, std::min<int64_t>(pool.num_threads(), units - 1));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SegmentAttention, SegmentAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
