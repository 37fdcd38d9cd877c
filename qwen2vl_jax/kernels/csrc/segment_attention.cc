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
//   q, k, v: f32[P, N, H] (the qkv projection's layout)
//   cos, sin: f32[P, H]      with `rotate`, q and k are first rotated (the vision rotary, see below); else unused
//   segments: i32[S, 2] = (first row, length); a length of 0 is a padded segment
//   o:       f32[P, N, H]    rows that no segment covers are 0
//
// Rotary: x * cos + rotate_half(x) * sin per row, rotate_half(x) = cat(-x[H/2:], x[:H/2]) (transformers
// apply_rotary_pos_emb_vision, in fp32). Keys and values are first copied head-major ([N, P, H], each head's rows
// contiguous: read in place from [P, N, H] their rows are N * H apart and the key loop misses the TLB on every row,
// 38 GFLOP/s in a first version); the keys are rotated on the way. That copy runs on the pool, one (tensor, head)
// per item, into per-thread buffers that are reused (fresh 5 MB buffers cost ~10 ms of page faults per call).
// Queries are rotated as each block is gathered. Done in XLA instead, the rotary and the transposes before and
// after the call were single-threaded element-wise ops: 17 ms of a ~400 ms fp32 vision block at 448x448 (2B).
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

#include "avx2_math.h"
#include "work_queue.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using qwen2vl_jax::exp256;

constexpr int kBQ = 48;    // queries per work unit: 6 vectors of 8 lanes (a multiple of 16 and of 24)
constexpr int kBK = 128;   // keys per block: the [kBK, kBQ] score tile (24 KB) stays in L1 (best of 64-512 here)

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

// dst[h] = x[h] * cos[h] + rotate_half(x)[h] * sin[h] in fp32 (separate multiplies and add, like the XLA ops).
inline void rotate_row(const float* x, const float* cos, const float* sin, int64_t H, float* dst) {
  const int64_t half = H / 2;
  for (int64_t h = 0; h < half; ++h) dst[h] = x[h] * cos[h] + (-x[h + half]) * sin[h];
  for (int64_t h = half; h < H; ++h) dst[h] = x[h] * cos[h] + x[h - half] * sin[h];
}

struct Job {
  const float *q, *k, *v;  // [P, N, H]
  const float *cos, *sin;  // [P, H] when rotate
  bool rotate;
  float* o;                // [P, N, H]
  float *kt, *vt;          // k (rotated) and v head-major [N, P, H]: the calling thread's scratch (phase 1)
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

// Phase 1: item i copies head i % N of k (i < N) or v into the head-major scratch.
struct HeadMajorCopy {
  std::shared_ptr<Job> job;
  qwen2vl_jax::WorkQueue queue;

  void work() {
    queue.drain([&](int64_t i) {
      const int64_t N = job->N, P = job->P, H = job->H, n = i % N;
      const float* src = (i < N ? job->k : job->v) + n * H;
      float* dst = (i < N ? job->kt : job->vt) + n * P * H;
      if (i < N && job->rotate) {
        for (int64_t p = 0; p < P; ++p) rotate_row(src + p * N * H, job->cos + p * H, job->sin + p * H, H, dst + p * H);
      } else {
        for (int64_t p = 0; p < P; ++p) std::memcpy(dst + p * H, src + p * N * H, sizeof(float) * H);
      }
    });
  }
};

// One block of kBQ queries of one head of one segment, in the transposed layout (queries along the vector lanes):
// every softmax reduction then runs down columns, lane-parallel, with no horizontal sums.
void Job::run_unit(int64_t u, std::vector<float>& buf) const {
  const int64_t sh = std::upper_bound(unit_start.begin(), unit_start.end(), u) - unit_start.begin() - 1;
  const int64_t s = sh / N, n = sh % N, qb = u - unit_start[sh];
  const int64_t first = seg[2 * s], L = seg[2 * s + 1];
  const int64_t q0 = qb * kBQ, nq = std::min<int64_t>(kBQ, L - q0);
  const int64_t row = H;  // head-major scratch: row j of head n at (n * P + j) * H
  const float* kh = kt + (n * P + first) * H;  // key j, dim h at kh[j * H + h]
  const float* vh = vt + (n * P + first) * H;

  buf.resize(H * kBQ + kBK * kBQ + 2 * H * kBQ + 2 * kBQ + H);
  float* QT = buf.data();       // [H][kBQ]: scaled queries, transposed (padded queries are 0)
  float* ST = QT + H * kBQ;     // [kBK][kBQ]: scores^T, then probabilities^T
  float* OT = ST + kBK * kBQ;   // [H][kBQ]: unnormalised output^T
  float* BT = OT + H * kBQ;     // [H][kBQ]: this key block's contribution
  float* m = BT + H * kBQ;      // [kBQ] running max per query
  float* l = m + kBQ;           // [kBQ] running sum per query
  float* rq = l + kBQ;          // [H] one rotated query

  for (int64_t i = 0; i < kBQ; ++i) {
    const int64_t p = first + q0 + i;
    const float* src = q + (p * N + n) * H;
    if (i < nq && rotate) {
      rotate_row(src, cos + p * H, sin + p * H, H, rq);
      src = rq;
    }
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
    float* dst = o + ((first + q0 + i) * N + n) * H;
    const float inv = 1.0f / l[i];
    for (int64_t h = 0; h < H; ++h) dst[h] = OT[h * kBQ + i] * inv;
  }
}

ffi::Error SegmentAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                                ffi::Buffer<ffi::S32> seg, ffi::ResultBuffer<ffi::F32> o, float scale, bool rotate) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), sd = seg.dimensions();
  bool same = qd.size() == 3 && kd.size() == 3 && vd.size() == 3;
  for (size_t i = 0; same && i < 3; ++i) same = kd[i] == qd[i] && vd[i] == qd[i];
  if (!same || sd.size() != 2 || sd[1] != 2) {
    return ffi::Error::InvalidArgument("segment_attention expects q, k, v f32[P, N, H] and segments i32[S, 2]");
  }
  auto job = std::make_shared<Job>();
  job->q = q.typed_data(), job->k = k.typed_data(), job->v = v.typed_data(), job->o = o->typed_data();
  job->seg = seg.typed_data();
  job->P = qd[0], job->N = qd[1], job->H = qd[2], job->S = sd[0], job->scale = scale;
  if (job->H % 8 != 0) return ffi::Error::InvalidArgument("segment_attention needs a head dim multiple of 8");
  auto cd = cos.dimensions(), nd = sin.dimensions();
  job->rotate = rotate;
  if (rotate && (cd.size() != 2 || nd.size() != 2 || cd[0] != job->P || cd[1] != job->H || nd[0] != job->P ||
                 nd[1] != job->H)) {
    return ffi::Error::InvalidArgument("segment_attention: rotary cos and sin must be f32[P, H]");
  }
  job->cos = cos.typed_data(), job->sin = sin.typed_data();
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
  // Scratch owned by this thread (concurrent calls run on different threads; pool tasks that start after the call
  // returned find no work left and never touch it), grown as needed and kept: no page faults after the first call.
  thread_local std::vector<float> scratch;
  const size_t elems = static_cast<size_t>(job->P * job->N * job->H);
  if (scratch.size() < 2 * elems) scratch.resize(2 * elems);
  job->kt = scratch.data(), job->vt = scratch.data() + elems;
  auto copy = std::make_shared<HeadMajorCopy>();
  copy->job = job;
  copy->queue.count = 2 * job->N;
  qwen2vl_jax::run_on_pool(pool, copy, std::min<int64_t>(pool.num_threads() - 1, copy->queue.count - 1));
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
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("rotate"));
