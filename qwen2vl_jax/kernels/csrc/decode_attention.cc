// One decode step's attention over the KV cache, for XLA:CPU on AVX2 machines.
//
// Why: in a decode step each layer attends one query per head to the cached keys (GQA: G query heads share a
// kv head). That is ~1 M multiply-adds per layer, but written as XLA ops it becomes ~10 small ops (two copies of
// the cache into a dot-friendly layout, two library dots, the softmax's exp / sum / divide), each paying a dispatch:
// ~0.45 ms per layer, 12-15 ms of a ~290 ms fp32 2B decode step (measured with the JAX profiler, docs/BENCHMARKS.md).
// Here it is one call that reads each cached key and value row once.
//
//   s[b, n, j] = q[b, n, :] . k[b, j, n / G, :] * scale        (j a valid slot; other slots get -FLT_MAX)
//   p[b, n, :] = softmax(s[b, n, :])                           (max-subtracted exp, divided by the sum)
//   o[b, n, :] = sum_j p[b, n, j] v[b, j, n / G, :]
//
//   q: f32[B, N, H]   k, v: f32 or bf16 [B, S, K, H] (the cache layout)   valid: pred[B, S]   o: f32[B, N, H]
//
// This is the XLA formulation in text.py step by step (masked scores are finfo(f32).min, not -inf, so a row with
// no valid slot averages every slot as XLA's does), with p rounded to bf16 before the value product when
// `probs_bf16` is set (the model casts probabilities to its bf16 activations, as PyTorch does). Sums run in 8-lane
// fp32 partials, so results match the XLA ops to fp32 rounding. Work units are (row, kv head), spread over XLA's
// intra-op pool with the shared work queue.
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
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
using qwen2vl_jax::hsum;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // 8 bf16 -> 8 fp32 (exact)
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Cached rows of one kv head are K * H elements apart (the [B, S, K, H] layout), a stride the hardware prefetcher
// follows poorly; and in a decode step the cache comes from DRAM (the weights streamed since evict it). Asking for
// the row kPrefetch slots ahead keeps several misses in flight (measured: 2048 slots 860 -> see BENCHMARKS.md).
constexpr int64_t kPrefetch = 6;

template <_mm_hint Hint = _MM_HINT_T0, class T>
inline void prefetch_row(const T* row, int64_t H) {
  const char* c = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < H * static_cast<int64_t>(sizeof(T)); off += 64) _mm_prefetch(c + off, Hint);
}

inline float round_to_bf16(float x) {  // round to nearest even, as XLA's f32 -> bf16 convert (finite inputs)
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&x, &bits, 4);
  return x;
}

// Scores of GC query heads (q rows q0 .. q0 + GC - 1, each H long) against one key row: GC independent FMA chains.
template <int GC, class T>
inline void score_row(const float* q0, int64_t H, const T* krow, float scale, float* out, int64_t stride) {
  __m256 acc[GC];
  for (int g = 0; g < GC; ++g) acc[g] = _mm256_setzero_ps();
  for (int64_t h = 0; h < H; h += 8) {
    const __m256 kv = load8(krow + h);
    for (int g = 0; g < GC; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + g * H + h), kv, acc[g]);
  }
  for (int g = 0; g < GC; ++g) out[g * stride] = hsum(acc[g]) * scale;
}

template <class T>
void score_rows(int64_t G, const float* q, int64_t H, const T* krow, float scale, float* out, int64_t stride) {
  for (int64_t g0 = 0; g0 < G; g0 += 8) {
    const float* q0 = q + g0 * H;
    float* o = out + g0 * stride;
    switch (G - g0 < 8 ? G - g0 : 8) {
      case 1: score_row<1>(q0, H, krow, scale, o, stride); break;
      case 2: score_row<2>(q0, H, krow, scale, o, stride); break;
      case 3: score_row<3>(q0, H, krow, scale, o, stride); break;
      case 4: score_row<4>(q0, H, krow, scale, o, stride); break;
      case 5: score_row<5>(q0, H, krow, scale, o, stride); break;
      case 6: score_row<6>(q0, H, krow, scale, o, stride); break;
      case 7: score_row<7>(q0, H, krow, scale, o, stride); break;
      default: score_row<8>(q0, H, krow, scale, o, stride); break;
    }
  }
}

template <class T>
struct Job {
  const float* q;
  const T *k, *v;
  const bool* valid;
  float* o;
  int64_t B, S, K, N, H;
  float scale;
  bool probs_bf16;
  qwen2vl_jax::WorkQueue queue;  // one item per (row b, kv head)

  void unit(int64_t item) {
    const int64_t b = item / K, kh = item % K, G = N / K;
    const float* qb = q + (b * N + kh * G) * H;  // the G query heads of this kv head
    float* ob = o + (b * N + kh * G) * H;
    const bool* vb = valid + b * S;
    std::vector<float> p(G * S);  // scores, then probabilities: [G, S]
    const int64_t row_stride = K * H;
    const T* kbase = k + (b * S * K + kh) * H;  // slot j's key row: kbase + j * row_stride
    const T* vbase = v + (b * S * K + kh) * H;
    for (int64_t j = 0; j < S; ++j) {
      if (j + kPrefetch < S) {
        prefetch_row(kbase + (j + kPrefetch) * row_stride, H);
        prefetch_row<_MM_HINT_T1>(vbase + (j + kPrefetch) * row_stride, H);  // to L2, for the value loop below
      }
      if (vb[j]) {
        score_rows(G, qb, H, kbase + j * row_stride, scale, p.data() + j, S);
      } else {
        for (int64_t g = 0; g < G; ++g) p[g * S + j] = -FLT_MAX;
      }
    }
    const int64_t S8 = S - S % 8;
    for (int64_t g = 0; g < G; ++g) {  // softmax over the slots, like jax.nn.softmax
      float* pg = p.data() + g * S;
      float mx = -FLT_MAX;
      for (int64_t j = 0; j < S; ++j) mx = pg[j] > mx ? pg[j] : mx;
      const __m256 mxv = _mm256_set1_ps(mx);
      __m256 sv = _mm256_setzero_ps();
      for (int64_t j = 0; j < S8; j += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(pg + j), mxv));
        _mm256_storeu_ps(pg + j, e);
        sv = _mm256_add_ps(sv, e);
      }
      float sum = hsum(sv);
      if (S8 < S) {  // the tail through the same vector exp
        float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t j = S8; j < S; ++j) tail[j - S8] = pg[j] - mx;
        float e[8];
        _mm256_storeu_ps(e, exp256(_mm256_loadu_ps(tail)));
        for (int64_t j = S8; j < S; ++j) sum += (pg[j] = e[j - S8]);
      }
      for (int64_t j = 0; j < S; ++j) {
        const float pj = pg[j] / sum;
        pg[j] = probs_bf16 ? round_to_bf16(pj) : pj;
      }
    }
    // o[g, :] = sum_j p[g, j] v[j, :]: each value row is read once, the G output rows stay in L1.
    std::vector<float> acc(G * H, 0.0f);
    for (int64_t j = 0; j < kPrefetch && j < S; ++j) prefetch_row(vbase + j * row_stride, H);
    for (int64_t j = 0; j < S; ++j) {
      if (j + kPrefetch < S) prefetch_row(vbase + (j + kPrefetch) * row_stride, H);
      const T* vrow = vbase + j * row_stride;
      for (int64_t h = 0; h < H; h += 8) {
        const __m256 vv = load8(vrow + h);
        for (int64_t g = 0; g < G; ++g) {
          float* a = acc.data() + g * H + h;
          _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_set1_ps(p[g * S + j]), vv, _mm256_loadu_ps(a)));
        }
      }
    }
    std::memcpy(ob, acc.data(), sizeof(float) * G * H);
  }

  void work() {
    queue.drain([&](int64_t item) { unit(item); });
  }
};

template <class T>
ffi::Error Run(ffi::ThreadPool& pool, const float* q, const T* k, const T* v, const bool* valid, float* o,
               int64_t B, int64_t S, int64_t K, int64_t N, int64_t H, float scale, bool probs_bf16) {
  auto job = std::make_shared<Job<T>>();
  job->q = q, job->k = k, job->v = v, job->valid = valid, job->o = o;
  job->B = B, job->S = S, job->K = K, job->N = N, job->H = H;
  job->scale = scale, job->probs_bf16 = probs_bf16;
  job->queue.count = B * K;
  if (job->queue.count == 0) return ffi::Error::Success();
  qwen2vl_jax::run_on_pool(pool, job, std::min<int64_t>(pool.num_threads(), job->queue.count - 1));
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                               ffi::Buffer<ffi::PRED> valid, ffi::ResultBuffer<ffi::F32> o, float scale,
                               bool probs_bf16) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = valid.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || md.size() != 2) {
    return ffi::Error::InvalidArgument("decode_attention expects q[B, N, H], k and v [B, S, K, H], valid[B, S]");
  }
  const int64_t B = qd[0], N = qd[1], H = qd[2], S = kd[1], K = kd[2];
  for (int i = 0; i < 4; ++i) {
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("decode_attention: k and v shapes differ");
  }
  if (kd[0] != B || kd[3] != H || md[0] != B || md[1] != S || K == 0 || N % K != 0) {
    return ffi::Error::InvalidArgument("decode_attention: inconsistent shapes (need N a multiple of K)");
  }
  if (H % 8 != 0) return ffi::Error::InvalidArgument("decode_attention needs a head dim multiple of 8");
  if (k.element_type() != v.element_type()) {
    return ffi::Error::InvalidArgument("decode_attention: k and v dtypes differ");
  }
  const bool* mask = valid.typed_data();
  if (k.element_type() == ffi::DataType::F32) {
    return Run(pool, q.typed_data(), static_cast<const float*>(k.untyped_data()),
               static_cast<const float*>(v.untyped_data()), mask, o->typed_data(), B, S, K, N, H, scale,
               probs_bf16);
  }
  if (k.element_type() == ffi::DataType::BF16) {
    return Run(pool, q.typed_data(), static_cast<const uint16_t*>(k.untyped_data()),
               static_cast<const uint16_t*>(v.untyped_data()), mask, o->typed_data(), B, S, K, N, H, scale,
               probs_bf16);
  }
  return ffi::Error::InvalidArgument("decode_attention: the cache must be f32 or bf16");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("probs_bf16"));
