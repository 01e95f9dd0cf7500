// ragtop's ONNX Runtime custom-op library: ragtop::TopKAttention, ragtop::RaggedEmbedding and
// ragtop::MatMulBlocks (the block-quantized matmul; its section below has its own notes).
//
// The contract (inputs, outputs, attributes, semantics) is ragtop/export/ops.py; the
// reference semantics are TopKAttention / RaggedEmbedding in ragtop/model/. This file
// reproduces them exactly (up to float summation order):
//
//   * query s of sequence b sits at p = past_lengths[b] + s and sees keys j <= p;
//   * it keeps its `topk` highest-scoring visible keys, ties going to the lower key index,
//     and takes the softmax over them;
//   * always kept: the visible keys j < sink_tokens or j > p - local_window; top-k runs
//     over the other visible keys ("candidates") and the softmax over both sets;
//   * block selection (block_size > 0): each query keeps its own block plus the
//     `block_budget` earlier eligible blocks (holding a candidate) with the largest upper
//     bound sum_d max(q_d * kmin_d, q_d * kmax_d) (ties: lower block), then runs exact
//     top-k over the candidates of the chosen blocks.
//   * optional input 8, attention_dense [B] (or [1]) int64: a sequence with a non-zero flag attends
//     to all its visible keys (exact dense softmax; how a speculative verification pass
//     runs on the same graph); its cache and summary writes are unchanged.
//   * optional input 9, block_table [B, M] int64 (paged KV cache): the cache inputs are page
//     pools [N, Hkv, P, Dh] (summaries [N, Hkv, P/bs, Dh]) and key/value row j of sequence b is
//     pool[block_table[b, j / P], h, j % P]; absent = the contiguous [B, Hkv, C, Dh] layout.
//     Only addressing changes (struct Rows): key tiles stop at page boundaries.
//
// Performance notes (see docs/kernels.md):
//   * the KV cache is updated in place when present_* is bound to the same memory as
//     past_* (IO binding); otherwise past is copied to present first;
//   * no score matrix is ever materialised: keys stream past in tiles of 64, and each query
//     row keeps a lazy top-k buffer (threshold compare + nth_element when 2k candidates
//     have piled up), so selection is O(L) compares plus O(k) amortised work per accepted
//     candidate, never a sort of L scores;
//   * work items are (sequence, KV head, query chunk); the query heads sharing a KV head
//     (GQA) are scored in the same pass over the keys, so each key row is read once;
//   * items run on onnxruntime's intra-op thread pool (KernelContext_ParallelFor): the
//     library starts no threads of its own and links against nothing but libc/libstdc++;
//   * the hot loops are plain C++ loops compiled twice (target_clones: x86-64-v3 = AVX2
//     + FMA, and the baseline), picked at load time by the CPU, so the .so loads on any
//     x86-64 machine and uses AVX2 where present.
//
// Built without linking libonnxruntime: ORT_API_MANUAL_INIT + the OrtApiBase handed to
// RegisterCustomOps. The API version is checked there, with a clear error.

#define ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(RAGTOP_NO_CLONES)
#define RAGTOP_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RAGTOP_HOT
#endif
// the same with an AVX-512 clone too (x86-64-v4), for loops that profit from it
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(RAGTOP_NO_CLONES)
#define RAGTOP_HOT512 __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RAGTOP_HOT512
#endif

namespace ragtop {

using Ort::Custom::Tensor;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------
// Small numeric helpers. `omp simd reduction` (compiled with -fopenmp-simd: no OpenMP
// runtime is linked) lets the compiler keep 8 partial sums in one vector register.

static inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

// Upper bound of q.k over a block with element-wise key bounds [lo, hi].
static inline float block_bound(const float* __restrict q, const float* __restrict lo,
                                const float* __restrict hi, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += std::max(q[d] * lo[d], q[d] * hi[d]);
  return s;
}

// ---------------------------------------------------------------------------------------
// Cache element types. The KV cache holds float or IEEE half (uint16_t bits, the contract's
// float16 cache); queries, outputs and the block summaries are float. A half row is
// widened to float in registers (F16C vcvtph2ps where the CPU has it, a portable bit
// conversion otherwise) and new rows are narrowed with round-to-nearest-even (vcvtps2ph,
// or the same rounding in portable code), so the stored keys are what torch's
// `.to(torch.float16)` gives and the summaries are exact bounds of those stored keys.
using Half = uint16_t;

static inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Portable conversions (after Maratyszcza's FP16 library): exact for normals, subnormals,
// infinities and NaN; float -> half rounds to nearest even.
static inline float half_to_float(Half h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  return f32_from_bits(sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized)));
}
static inline Half float_to_half(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<Half>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// Row conversions, picked once at load time like the score tiles below.
using HalfToFloatFn = void (*)(const Half* src, int64_t n, float* dst);
using FloatToHalfFn = void (*)(const float* src, int64_t n, Half* dst);
static void half_to_float_generic(const Half* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
}
static void float_to_half_generic(const float* src, int64_t n, Half* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_half(src[i]);
}
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx,f16c"))) static void half_to_float_f16c(const Half* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}
__attribute__((target("avx,f16c"))) static void float_to_half_f16c(const float* src, int64_t n, Half* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = float_to_half(src[i]);
}
static bool has_f16c() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
}
static const HalfToFloatFn half_row_to_float = has_f16c() ? half_to_float_f16c : half_to_float_generic;
static const FloatToHalfFn float_row_to_half = has_f16c() ? float_to_half_f16c : float_to_half_generic;
#else
static const HalfToFloatFn half_row_to_float = half_to_float_generic;
static const FloatToHalfFn float_row_to_half = float_to_half_generic;
#endif

// out[d] += w * v[d] over a half row (the weighted sum of value rows).
using HalfAxpyFn = void (*)(float w, const Half* v, int64_t n, float* out);
static void half_axpy_generic(float w, const Half* v, int64_t n, float* out) {
  for (int64_t d = 0; d < n; ++d) out[d] += w * half_to_float(v[d]);
}
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx2,fma,f16c"))) static void half_axpy_f16c(float w, const Half* v, int64_t n, float* out) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + d)));
    _mm256_storeu_ps(out + d, _mm256_fmadd_ps(wv, x, _mm256_loadu_ps(out + d)));
  }
  for (; d < n; ++d) out[d] += w * half_to_float(v[d]);
}
static HalfAxpyFn pick_half_axpy() {
  __builtin_cpu_init();
  return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
             ? half_axpy_f16c
             : half_axpy_generic;
}
static const HalfAxpyFn half_axpy = pick_half_axpy();
#else
static const HalfAxpyFn half_axpy = half_axpy_generic;
#endif

// A cache row as float: the row itself, or its widened copy in `buf` (n floats).
static inline const float* as_float(const float* row, int64_t, float*) { return row; }
static inline const float* as_float(const Half* row, int64_t n, float* buf) {
  half_row_to_float(row, n, buf);
  return buf;
}
// Store a new float row into the cache (a copy, or a rounding to half).
static inline void store_row(const float* src, int64_t n, float* dst) { std::memcpy(dst, src, n * sizeof(float)); }
static inline void store_row(const float* src, int64_t n, Half* dst) { float_row_to_half(src, n, dst); }

// ---------------------------------------------------------------------------------------
// Score tiles: out[r * n + i] = q_r . k_i for R query rows and n (<= kTile) consecutive key
// rows. This is where exact top-k spends its time. The AVX2 version scores 8 keys at once
// for one row: 8 vector accumulators over d (one FMA per 8 floats, no horizontal sum in the
// loop), then one 8-way horizontal reduction (hadd + lane permute) gives the 8 scores in
// one register. The key tile (n x Dh floats) stays in L1 across the rows. Picked once at
// load time from the CPU's features, so the library runs on any x86-64.
constexpr int64_t kTile = 64;
using ScoreTileFn = void (*)(const float* q, int64_t R, const float* k, int64_t n, int64_t Dh, float* out);
using ScoreTileHalfFn = void (*)(const float* q, int64_t R, const Half* k, int64_t n, int64_t Dh, float* out);

static void score_tile_generic(const float* q, int64_t R, const float* k, int64_t n, int64_t Dh, float* out) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < n; ++i) out[r * n + i] = dot(q + r * Dh, k + i * Dh, Dh);
}
// half keys without AVX2: widen the tile's rows (contiguous) once, then score as float
static void score_tile_half_generic(const float* q, int64_t R, const Half* k, int64_t n, int64_t Dh, float* out) {
  thread_local std::vector<float> buf;
  buf.resize(static_cast<size_t>(n * Dh));
  half_row_to_float(k, n * Dh, buf.data());
  score_tile_generic(q, R, buf.data(), n, Dh, out);
}

#if defined(__GNUC__) && defined(__x86_64__)
// 8 consecutive cache elements as floats: a load, or a load + vcvtph2ps (F16C)
__attribute__((target("avx2,fma,f16c"))) static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma,f16c"))) static inline __m256 load8(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <typename KV>
__attribute__((target("avx2,fma,f16c"))) static void score_tile_avx2(const float* q, int64_t R, const KV* k, int64_t n,
                                                                      int64_t Dh, float* out) {
  if (Dh % 8) {
    if constexpr (std::is_same_v<KV, float>) return score_tile_generic(q, R, k, n, Dh, out);
    else return score_tile_half_generic(q, R, k, n, Dh, out);
  }
  const int64_t n8 = n - n % 8;
  for (int64_t r = 0; r < R; ++r) {
    const float* qr = q + r * Dh;
    float* o = out + r * n;
    for (int64_t i = 0; i < n8; i += 8) {  // hot loop: 8 keys x Dh
      const KV* k0 = k + i * Dh;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
      for (int64_t d = 0; d < Dh; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qr + d);
        a0 = _mm256_fmadd_ps(qv, load8(k0 + 0 * Dh + d), a0);
        a1 = _mm256_fmadd_ps(qv, load8(k0 + 1 * Dh + d), a1);
        a2 = _mm256_fmadd_ps(qv, load8(k0 + 2 * Dh + d), a2);
        a3 = _mm256_fmadd_ps(qv, load8(k0 + 3 * Dh + d), a3);
        a4 = _mm256_fmadd_ps(qv, load8(k0 + 4 * Dh + d), a4);
        a5 = _mm256_fmadd_ps(qv, load8(k0 + 5 * Dh + d), a5);
        a6 = _mm256_fmadd_ps(qv, load8(k0 + 6 * Dh + d), a6);
        a7 = _mm256_fmadd_ps(qv, load8(k0 + 7 * Dh + d), a7);
      }
      // 8 accumulators -> [sum a0, ..., sum a7]
      const __m256 h01 = _mm256_hadd_ps(a0, a1), h23 = _mm256_hadd_ps(a2, a3);
      const __m256 h45 = _mm256_hadd_ps(a4, a5), h67 = _mm256_hadd_ps(a6, a7);
      const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
      const __m256 lo = _mm256_permute2f128_ps(h0123, h4567, 0x20);
      const __m256 hi = _mm256_permute2f128_ps(h0123, h4567, 0x31);
      _mm256_storeu_ps(o + i, _mm256_add_ps(lo, hi));
    }
    for (int64_t i = n8; i < n; ++i) {
      if constexpr (std::is_same_v<KV, float>) {
        o[i] = dot(qr, k + i * Dh, Dh);
      } else {  // one half row: 8 lanes at a time
        __m256 a = _mm256_setzero_ps();
        for (int64_t d = 0; d < Dh; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), load8(k + i * Dh + d), a);
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, a);
        o[i] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
      }
    }
  }
}
static ScoreTileFn pick_score_tile() {
  __builtin_cpu_init();
  return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? score_tile_avx2<float> : score_tile_generic;
}
static ScoreTileHalfFn pick_score_tile_half() {
  __builtin_cpu_init();
  return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
             ? score_tile_avx2<Half>
             : score_tile_half_generic;
}
#else
static ScoreTileFn pick_score_tile() { return score_tile_generic; }
static ScoreTileHalfFn pick_score_tile_half() { return score_tile_half_generic; }
#endif
static const ScoreTileFn score_tile_f32 = pick_score_tile();
static const ScoreTileHalfFn score_tile_f16 = pick_score_tile_half();
static inline void score_tile(const float* q, int64_t R, const float* k, int64_t n, int64_t Dh, float* out) {
  score_tile_f32(q, R, k, n, Dh, out);
}
static inline void score_tile(const float* q, int64_t R, const Half* k, int64_t n, int64_t Dh, float* out) {
  score_tile_f16(q, R, k, n, Dh, out);
}

// ---------------------------------------------------------------------------------------
// TopK: the k best (score, index) pairs of a stream, "best" meaning higher score and, among
// equal scores, lower index (the reference's tie rule).
//
// A lazy selection buffer rather than a heap: candidates whose score beats the threshold
// `thr` are appended (two stores); when the buffer holds `cap` (~2k) of them, nth_element
// keeps the k best and `thr` becomes the k-th best score. Candidates arrive in increasing
// index order, so a newcomer equal to `thr` loses to every kept entry with that score:
// the strict `score > thr` test in the callers' hot loops is exactly the tie rule. Once the
// threshold settles, almost every score fails that one compare; the rest cost O(1)
// amortised (a heap's sift would cost O(log k) branchy steps per accepted candidate, which
// dominated prefill where rows are short and acceptances frequent).
struct Cand {
  float s;
  int32_t j;
};
static inline bool better(const Cand& a, const Cand& b) { return a.s > b.s || (a.s == b.s && a.j < b.j); }

struct TopK {
  Cand* c = nullptr;
  int32_t n = 0, k = 0, cap = 0;
  float thr = kNegInf;  // -inf until the first compaction

  static int32_t capacity(int64_t k) { return static_cast<int32_t>(2 * k + 16); }
  void reset(Cand* buf, int64_t kk) {
    c = buf, n = 0, k = static_cast<int32_t>(kk), cap = capacity(kk), thr = kNegInf;
  }
  void push(float sc, int32_t idx) {
    c[n++] = Cand{sc, idx};
    if (n == cap) compact();
  }
  void compact() {  // keep the k best, threshold = the k-th best score
    if (n <= k) return;
    std::nth_element(c, c + (k - 1), c + n, better);
    thr = c[k - 1].s;
    n = k;
  }
};

// Offer scores t[0..m) of keys j0.. to a selection. Groups of 16 whose maximum does not
// beat the threshold (the common case once it has settled) are skipped with one vector
// max-reduction and one compare.
static inline void select_scores(TopK& tk, const float* __restrict t, int64_t m, int64_t j0) {
  int64_t i = 0;
  for (; i + 16 <= m; i += 16) {
    float mx = kNegInf;
#pragma omp simd reduction(max : mx)
    for (int64_t u = 0; u < 16; ++u) mx = std::max(mx, t[i + u]);
    if (!(mx > tk.thr)) continue;
    for (int64_t u = i; u < i + 16; ++u)
      if (t[u] > tk.thr) tk.push(t[u], static_cast<int32_t>(j0 + u));
  }
  for (; i < m; ++i)
    if (t[i] > tk.thr) tk.push(t[i], static_cast<int32_t>(j0 + i));
}

// Where key/value row j of one (sequence, KV head) lives: contiguous (table == nullptr:
// base + j * Dh) or paged (row j % per_page of page table[j / per_page], pages page_stride
// elements apart). Block summaries use the same struct with rows = blocks.
template <typename T>
struct Rows {
  T* base = nullptr;
  const int64_t* table = nullptr;
  int64_t per_page = 0, page_stride = 0, Dh = 0;
  int shift = -1;  // log2(per_page) when a power of two: a shift, not a 64-bit division, per row
  Rows(T* b, const int64_t* t, int64_t per, int64_t stride, int64_t dh)
      : base(b), table(t), per_page(per), page_stride(stride), Dh(dh) {
    if (per > 0 && (per & (per - 1)) == 0) shift = __builtin_ctzll(static_cast<unsigned long long>(per));
  }
  T* row(int64_t j) const {
    if (!table) return base + j * Dh;
    if (shift >= 0) return base + table[j >> shift] * page_stride + (j & (per_page - 1)) * Dh;
    return base + table[j / per_page] * page_stride + (j % per_page) * Dh;
  }
  // rows from j on that are consecutive in memory (up to the end of j's page)
  int64_t run(int64_t j) const { return table ? per_page - j % per_page : std::numeric_limits<int64_t>::max(); }
};

// Always-kept keys of the query at position p: [0, min(sink, p+1)) and
// [max(sink, p+1-window), p]; their scores (qs . k) go to `out`, returns how many.
// `row`: Dh floats of scratch for a widened half row (unused with a float cache).
template <typename KV>
static inline int64_t forced_keys(const float* __restrict qs, const Rows<const KV>& keys, int64_t Dh, int64_t p,
                                  int64_t sink, int64_t window, Cand* out, float* row) {
  int64_t n = 0;
  const int64_t a = std::min(sink, p + 1);
  if constexpr (std::is_same_v<KV, Half>) {  // both spans are contiguous: score them as tiles (F16C)
    float t[kTile];
    auto span = [&](int64_t j0, int64_t j1) {
      for (int64_t s0 = j0, m = 0; s0 < j1; s0 += m) {
        m = std::min({kTile, j1 - s0, keys.run(s0)});
        score_tile(qs, 1, keys.row(s0), m, Dh, t);
        for (int64_t i = 0; i < m; ++i) out[n++] = Cand{t[i], static_cast<int32_t>(s0 + i)};
      }
    };
    span(0, a);
    span(std::max(sink, p + 1 - window), p + 1);
    return n;
  }
  for (int64_t j = 0; j < a; ++j) out[n++] = Cand{dot(qs, as_float(keys.row(j), Dh, row), Dh), static_cast<int32_t>(j)};
  for (int64_t j = std::max(sink, p + 1 - window); j <= p; ++j)
    out[n++] = Cand{dot(qs, as_float(keys.row(j), Dh, row), Dh), static_cast<int32_t>(j)};
  return n;
}

// Softmax over the kept entries and the `nf` always-kept ones, weighted sum of their
// value rows -> out[Dh]. `row`: as in forced_keys.
template <typename KV>
static inline void softmax_gather(TopK& t, const Rows<const KV>& vrows, int64_t Dh, float* __restrict out,
                                  const Cand* forced, int64_t nf, float* row) {
  t.compact();
  std::fill(out, out + Dh, 0.f);
  if (t.n == 0 && nf == 0) return;
  float m = kNegInf;
  for (int32_t i = 0; i < t.n; ++i) m = std::max(m, t.c[i].s);
  for (int64_t i = 0; i < nf; ++i) m = std::max(m, forced[i].s);
  float total = 0.f;
  auto add = [&](const Cand& c) {
    const float w = std::exp(c.s - m);
    total += w;
    if constexpr (std::is_same_v<KV, Half>) {
      half_axpy(w, vrows.row(c.j), Dh, out);  // widened in registers
    } else {
      const float* __restrict v = as_float(vrows.row(c.j), Dh, row);
#pragma omp simd
      for (int64_t d = 0; d < Dh; ++d) out[d] += w * v[d];
    }
  };
  for (int32_t i = 0; i < t.n; ++i) add(t.c[i]);
  for (int64_t i = 0; i < nf; ++i) add(forced[i]);
  const float inv = 1.f / total;
#pragma omp simd
  for (int64_t d = 0; d < Dh; ++d) out[d] *= inv;
}

// ---------------------------------------------------------------------------------------
// Online softmax over key tiles: the dense path (a speculative verification, or a graph
// whose top-k keeps every key) and block mode when its top-k keeps every key of the chosen
// blocks. A row's state is its running maximum m, running sum l and unnormalised output
// acc[Dh]; one tile folds in scores t[0..cnt) (q.k, already scaled) with the tile's values
// vt (n x Dh floats, row-major) and leaves exp(t - m) in t. The AVX2 version exponentiates
// 8 scores at once (Cephes' polynomial, ~1 ulp; glibc's expf is one call per score) and
// keeps 64 output floats in 8 registers across the tile's keys (the value rows are loaded
// once per row; acc is loaded and stored once per tile, not once per key).
using SoftmaxTileFn = void (*)(float* t, int64_t cnt, const float* vt, int64_t Dh, float& m, float& l, float* acc);

static void softmax_tile_generic(float* t, int64_t cnt, const float* vt, int64_t Dh, float& m, float& l,
                                 float* acc) {
  float mx = kNegInf;
  for (int64_t k = 0; k < cnt; ++k) mx = std::max(mx, t[k]);
  const float m_new = std::max(m, mx);
  if (m_new == kNegInf) return;  // nothing visible yet
  if (m_new > m) {               // rescale what was summed under the old maximum
    const float corr = std::exp(m - m_new);
    l *= corr;
    for (int64_t d = 0; d < Dh; ++d) acc[d] *= corr;
    m = m_new;
  }
  for (int64_t k = 0; k < cnt; ++k) {
    const float w = std::exp(t[k] - m_new);
    t[k] = w, l += w;
    const float* __restrict v = vt + k * Dh;
    for (int64_t d = 0; d < Dh; ++d) acc[d] += w * v[d];
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
// exp(x) for x <= 0 (a score minus the running maximum), Cephes' expf: x = n ln2 + r with
// ln2 in two parts, exp(r) = 1 + r + r^2 p(r); 0 below kExpLo (and for -inf). The AVX2
// (exp8) and AVX-512 (exp16) versions evaluate these same constants in the same order.
namespace expf_poly {
constexpr float kLo = -87.33654f, kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace expf_poly

#define RAGTOP_AVX2 __attribute__((target("avx2,fma")))
RAGTOP_AVX2 static inline __m256 exp8(__m256 x) {
  using namespace expf_poly;
  const __m256 lo = _mm256_set1_ps(kLo);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), x);
  __m256 y = _mm256_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kP[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), keep);
}
RAGTOP_AVX2 static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
RAGTOP_AVX2 static inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
// lanes [0, r) of 8 (0 < r < 8) as a mask
RAGTOP_AVX2 static inline __m256i tail_mask(int64_t r) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(r)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
RAGTOP_AVX2 static void softmax_tile_avx2(float* t, int64_t cnt, const float* vt, int64_t Dh, float& m, float& l,
                                          float* acc) {
  if (Dh % 8) return softmax_tile_generic(t, cnt, vt, Dh, m, l, acc);
  const int64_t c8 = cnt - cnt % 8;
  const __m256 ninf = _mm256_set1_ps(kNegInf);
  const __m256i tm = tail_mask(cnt % 8);
  __m256 mx8 = ninf;
  for (int64_t k = 0; k < c8; k += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(t + k));
  if (c8 < cnt) mx8 = _mm256_max_ps(mx8, _mm256_blendv_ps(ninf, _mm256_maskload_ps(t + c8, tm), _mm256_castsi256_ps(tm)));
  const float m_new = std::max(m, hmax8(mx8));
  if (m_new == kNegInf) return;
  if (m_new > m) {
    const float corr = std::exp(m - m_new);
    l *= corr;
    const __m256 cv = _mm256_set1_ps(corr);
    for (int64_t d = 0; d < Dh; d += 8) _mm256_storeu_ps(acc + d, _mm256_mul_ps(cv, _mm256_loadu_ps(acc + d)));
    m = m_new;
  }
  const __m256 mv = _mm256_set1_ps(m_new);
  __m256 s8 = _mm256_setzero_ps();
  for (int64_t k = 0; k < c8; k += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(t + k), mv));
    _mm256_storeu_ps(t + k, e), s8 = _mm256_add_ps(s8, e);
  }
  if (c8 < cnt) {  // the masked-off lanes are 0 after the and
    const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_maskload_ps(t + c8, tm), mv)), _mm256_castsi256_ps(tm));
    _mm256_maskstore_ps(t + c8, tm, e), s8 = _mm256_add_ps(s8, e);
  }
  l += hsum8(s8);
  int64_t d0 = 0;
  for (; d0 + 64 <= Dh; d0 += 64) {  // 64 output floats in registers across the keys
    float* a = acc + d0;
    __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8), a2 = _mm256_loadu_ps(a + 16),
           a3 = _mm256_loadu_ps(a + 24), a4 = _mm256_loadu_ps(a + 32), a5 = _mm256_loadu_ps(a + 40),
           a6 = _mm256_loadu_ps(a + 48), a7 = _mm256_loadu_ps(a + 56);
    for (int64_t k = 0; k < cnt; ++k) {
      const __m256 w = _mm256_broadcast_ss(t + k);
      const float* v = vt + k * Dh + d0;
      a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), a0), a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8), a1);
      a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 16), a2), a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 24), a3);
      a4 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 32), a4), a5 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 40), a5);
      a6 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 48), a6), a7 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 56), a7);
    }
    _mm256_storeu_ps(a, a0), _mm256_storeu_ps(a + 8, a1), _mm256_storeu_ps(a + 16, a2), _mm256_storeu_ps(a + 24, a3);
    _mm256_storeu_ps(a + 32, a4), _mm256_storeu_ps(a + 40, a5), _mm256_storeu_ps(a + 48, a6), _mm256_storeu_ps(a + 56, a7);
  }
  for (; d0 < Dh; d0 += 8) {  // head sizes that are not a multiple of 64: 8 at a time
    __m256 a = _mm256_loadu_ps(acc + d0);
    for (int64_t k = 0; k < cnt; ++k) a = _mm256_fmadd_ps(_mm256_broadcast_ss(t + k), _mm256_loadu_ps(vt + k * Dh + d0), a);
    _mm256_storeu_ps(acc + d0, a);
  }
}
static SoftmaxTileFn pick_softmax_tile() {
  __builtin_cpu_init();
  return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? softmax_tile_avx2 : softmax_tile_generic;
}
#else
static SoftmaxTileFn pick_softmax_tile() { return softmax_tile_generic; }
#endif
static const SoftmaxTileFn softmax_tile = pick_softmax_tile();

// n consecutive cache rows (Dh each) as floats: the rows themselves, or their widened copy
// in buf, followed by zero rows up to `padded` rows when padded > n
static inline const float* tile_as_float(const float* rows, int64_t n, int64_t padded, int64_t Dh,
                                         std::vector<float>& buf) {
  if (padded <= n) return rows;
  buf.assign(static_cast<size_t>(padded * Dh), 0.f);
  std::memcpy(buf.data(), rows, n * Dh * sizeof(float));
  return buf.data();
}
static inline const float* tile_as_float(const Half* rows, int64_t n, int64_t padded, int64_t Dh,
                                         std::vector<float>& buf) {
  buf.resize(static_cast<size_t>(std::max(n, padded) * Dh));
  half_row_to_float(rows, n * Dh, buf.data());
  std::fill(buf.begin() + n * Dh, buf.end(), 0.f);
  return buf.data();
}

// ---------------------------------------------------------------------------------------
// Attention problem description, shared by every work item of one Compute call.
struct AttnProblem {
  int64_t B, S, H, Hkv, G, Dh, C;
  int64_t topk, bs, budget, nb;  // nb = C / bs (block mode)
  int64_t sink, window;          // always-kept keys: j < sink or j > p - window
  float scale;
  const float* q;        // [B, S, H*Dh]
  const int64_t* lens;   // [B]
  const void* kc;        // present_key   [B, Hkv, C, Dh] (already holds the new keys), float or Half
  const void* vc;        // present_value [B, Hkv, C, Dh]
  const float* kmin;     // present_key_min [B, Hkv, nb, Dh] (block mode, updated)
  const float* kmax;
  float* out;            // [B, S, H*Dh]
  // paged layout (block_table != nullptr): kc/vc are [N, Hkv, P, Dh] pools, kmin/kmax
  // [N, Hkv, P/bs, Dh], sequence b's pages block_table[b*M .. b*M+M), C = M * P
  const int64_t* block_table = nullptr;
  int64_t M = 0, page = 0;

  // rows of sequence b, KV head h in a cache buffer (keys/values) or a summary buffer
  template <typename T>
  Rows<T> kv(T* base, int64_t b, int64_t h) const {
    if (!block_table) return Rows<T>(base + (b * Hkv + h) * C * Dh, nullptr, 0, 0, Dh);
    return Rows<T>(base + h * page * Dh, block_table + b * M, page, Hkv * page * Dh, Dh);
  }
  template <typename T>
  Rows<T> summary(T* base, int64_t b, int64_t h) const {
    if (!block_table) return Rows<T>(base + (b * Hkv + h) * nb * Dh, nullptr, 0, 0, Dh);
    const int64_t per = page / bs;
    return Rows<T>(base + h * per * Dh, block_table + b * M, per, Hkv * per * Dh, Dh);
  }
};

// One work item: sequence b, KV head kvh, query heads [h0, h0+nh) of that KV head's group,
// queries [s0, s1).
struct AttnItem {
  int64_t b, kvh, h0, nh, s0, s1;
};

// Per-thread scratch (selection buffers), reused across calls.
struct Scratch {
  std::vector<Cand> cand;   // key candidates, one buffer per row
  std::vector<TopK> rows;
  std::vector<Cand> bcand;  // block candidates
  std::vector<int32_t> blocks;
  std::vector<float> q;     // scaled query rows
  std::vector<float> tile;  // scores of one key tile
  std::vector<Cand> forced; // always-kept keys of one row
  std::vector<float> row;   // one widened half cache row
  std::vector<float> ktile, vtile;  // a key and a value tile widened to float (half cache)
  std::vector<float> qT, rowvec;     // the AVX-512 prefill path: queries as columns; per-row vectors
};
static Scratch& scratch() {
  thread_local Scratch sc;
  return sc;
}

// Exact mode: every visible key of the sequence is scored.
//
// Rows are (query s, head h) pairs in s-major order. Keys stream in index order; key j is
// visible to the rows whose position p = len + s >= j, a suffix of the row list, so the
// loop over rows starts at the first such row. Each key row (Dh floats) is loaded once
// and scored against all rows of the item (the GQA heads and the chunk's queries) while
// it sits in L1.
template <typename KV>
static void attend_exact(const AttnProblem& P, const AttnItem& it) {
  const int64_t len = P.lens[it.b], Dh = P.Dh;
  const int64_t ns = it.s1 - it.s0, R = ns * it.nh;
  const int64_t pmax = len + it.s1 - 1;
  const int64_t kcap = std::min<int64_t>(P.topk, pmax + 1);
  const Rows<const KV> keys = P.kv(static_cast<const KV*>(P.kc), it.b, it.kvh);
  const Rows<const KV> vals = P.kv(static_cast<const KV*>(P.vc), it.b, it.kvh);

  Scratch& sc = scratch();
  const int64_t cap = TopK::capacity(kcap);
  sc.cand.resize(R * cap), sc.rows.resize(R);
  // the item's query rows, pre-multiplied by the softmax scale (as the reference does)
  sc.q.resize(R * Dh);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t s = it.s0 + r / it.nh, h = it.h0 + r % it.nh;
    const float* src = P.q + ((it.b * P.S + s) * P.H + h) * Dh;
    for (int64_t d = 0; d < Dh; ++d) sc.q[r * Dh + d] = src[d] * P.scale;
    const int64_t p = len + s, nfree = std::max<int64_t>(0, p - P.window - P.sink + 1);  // candidates
    sc.rows[r].reset(sc.cand.data() + r * cap, std::min<int64_t>(P.topk, nfree));
  }
  TopK* sel = sc.rows.data();
  const float* qs = sc.q.data();
  sc.tile.resize(R * kTile);
  float* tile = sc.tile.data();

  for (int64_t j0 = 0, n = 0; j0 <= pmax; j0 += n) {
    n = std::min({kTile, pmax + 1 - j0, keys.run(j0)});  // a tile never crosses a page
    // rows that see at least key j0: query s with len + s >= j0 (a suffix of the rows)
    const int64_t r0 = std::max<int64_t>(0, j0 - len - it.s0) * it.nh;
    score_tile(qs + r0 * Dh, R - r0, keys.row(j0), n, Dh, tile);
    for (int64_t r = r0; r < R; ++r) {  // selection: one compare per score, rare pushes
      const int64_t p = len + it.s0 + r / it.nh;
      // the tile's candidates for this row: sink <= j <= p - window (and j <= p)
      const int64_t lo = std::max(j0, P.sink), hi = std::min(j0 + n, p + 1 - P.window);
      if (hi > lo) select_scores(sel[r], tile + (r - r0) * n + (lo - j0), hi - lo, lo);
    }
  }
  sc.forced.resize(std::min(P.C, P.sink + P.window));
  sc.row.resize(Dh);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t s = it.s0 + r / it.nh, h = it.h0 + r % it.nh;
    const int64_t nf = forced_keys(qs + r * Dh, keys, Dh, len + s, P.sink, P.window, sc.forced.data(), sc.row.data());
    softmax_gather(sel[r], vals, Dh, P.out + ((it.b * P.S + s) * P.H + h) * Dh, sc.forced.data(), nf, sc.row.data());
  }
}

// ---------------------------------------------------------------------------------------
// Dense prefill tiles on AVX-512 (calls with more than 32 queries: a prefill chunk has up to
// 96 rows per item). The rows are the vector lanes: qT [Dh, Rp] holds the item's scaled
// queries transposed (Rp = rows rounded up to 16, zero rows after), and the scores of a
// tile are computed key by key, ST[k, r] = sum_d K[k, d] qT[d, r], 4 keys x up to 6 row
// vectors of accumulators, so no horizontal sum is needed; maxima, rescaling and
// exponentials run 16 rows at a time, and the value sums take two rows per pass (8
// accumulator chains). Decode steps and verifications keep the AVX2 path above, so a
// verification's rows still add up exactly as single decode steps.
#if defined(__GNUC__) && defined(__x86_64__)
#define RAGTOP_AVX512 __attribute__((target("avx512f")))

// exp8 on 16 lanes (expf_poly)
RAGTOP_AVX512 static inline __m512 exp16(__m512 x) {
  using namespace expf_poly;
  const __m512 lo = _mm512_set1_ps(kLo);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n =
      _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), x);
  __m512 y = _mm512_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kP[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mov_ps(keep, _mm512_mul_ps(y, _mm512_castsi512_ps(e)));
}

// ST[k * Rp + 16v ..] = K[k] . qT[:, 16v ..] for KB keys and NV row vectors
template <int KB, int NV>
RAGTOP_AVX512 static void scores_kr(const float* kt, const float* qT, int64_t Rp, int64_t Dh, float* ST) {
  __m512 acc[KB][NV];
  for (int k = 0; k < KB; ++k)
    for (int v = 0; v < NV; ++v) acc[k][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < Dh; ++d) {
    __m512 qv[NV];
    for (int v = 0; v < NV; ++v) qv[v] = _mm512_loadu_ps(qT + d * Rp + 16 * v);
    for (int k = 0; k < KB; ++k) {
      const __m512 kb = _mm512_set1_ps(kt[k * Dh + d]);
      for (int v = 0; v < NV; ++v) acc[k][v] = _mm512_fmadd_ps(kb, qv[v], acc[k][v]);
    }
  }
  for (int k = 0; k < KB; ++k)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(ST + k * Rp + 16 * v, acc[k][v]);
}
template <int NV>
RAGTOP_AVX512 static void scores_tile_kr(const float* kt, int64_t n, const float* qT, int64_t Rp, int64_t Dh,
                                         float* ST) {
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) scores_kr<4, NV>(kt + k * Dh, qT, Rp, Dh, ST + k * Rp);
  for (; k < n; ++k) scores_kr<1, NV>(kt + k * Dh, qT, Rp, Dh, ST + k * Rp);
}

// acc[r + i] = corr[r + i] acc[r + i] + sum_k P[k, r + i] V[k] for i < ROWS (Dh a multiple
// of 64: 4 vectors of 16 outputs per row in registers across the keys)
template <int ROWS>
RAGTOP_AVX512 static void value_rows(const float* P, int64_t Rp, const float* vt, int64_t n, int64_t Dh,
                                     const float* lim, const float* corr, int64_t r, float* acc) {
  float last = lim[r];
  for (int i = 1; i < ROWS; ++i) last = std::max(last, lim[r + i]);
  const int64_t cnt = std::min<int64_t>(n, static_cast<int64_t>(last) + 1);  // keys any of the rows sees
  for (int64_t d0 = 0; d0 < Dh; d0 += 64) {
    __m512 a[ROWS][4];
    for (int i = 0; i < ROWS; ++i) {
      const __m512 c = _mm512_set1_ps(corr[r + i]);
      for (int j = 0; j < 4; ++j) a[i][j] = _mm512_mul_ps(c, _mm512_loadu_ps(acc + (r + i) * Dh + d0 + 16 * j));
    }
    for (int64_t k = 0; k < cnt; ++k) {
      const float* x = vt + k * Dh + d0;
      const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16), x2 = _mm512_loadu_ps(x + 32),
                   x3 = _mm512_loadu_ps(x + 48);
      for (int i = 0; i < ROWS; ++i) {
        const __m512 p = _mm512_set1_ps(P[k * Rp + r + i]);
        a[i][0] = _mm512_fmadd_ps(p, x0, a[i][0]), a[i][1] = _mm512_fmadd_ps(p, x1, a[i][1]);
        a[i][2] = _mm512_fmadd_ps(p, x2, a[i][2]), a[i][3] = _mm512_fmadd_ps(p, x3, a[i][3]);
      }
    }
    for (int i = 0; i < ROWS; ++i)
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc + (r + i) * Dh + d0 + 16 * j, a[i][j]);
  }
}

// One tile of n keys for the item's rows: scores from qT, online softmax per row (lanes), and
// the value sums. lim[r] = the last key of the tile row r sees, relative to the tile's first
// (-1: none), as floats; m / l: Rp running maxima / sums; acc: [R, Dh] row-major.
RAGTOP_AVX512 static void dense_tile_rows_avx512(const float* qT, int64_t R, int64_t Rp, const float* kt,
                                                  const float* vt, int64_t n, int64_t Dh, const float* lim,
                                                  float* m, float* l, float* acc, float* ST, float* corr) {
  const int64_t nv = Rp / 16;
  switch (nv) {
    case 1: scores_tile_kr<1>(kt, n, qT, Rp, Dh, ST); break;
    case 2: scores_tile_kr<2>(kt, n, qT, Rp, Dh, ST); break;
    case 3: scores_tile_kr<3>(kt, n, qT, Rp, Dh, ST); break;
    case 4: scores_tile_kr<4>(kt, n, qT, Rp, Dh, ST); break;
    case 5: scores_tile_kr<5>(kt, n, qT, Rp, Dh, ST); break;
    default: scores_tile_kr<6>(kt, n, qT, Rp, Dh, ST); break;
  }
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  for (int64_t v = 0; v < nv; ++v) {  // 16 rows at a time: mask, maximum, rescale, exponentials, sums
    const __m512 lv = _mm512_loadu_ps(lim + 16 * v);
    __m512 mx = ninf;
    for (int64_t k = 0; k < n; ++k) {
      const __mmask16 seen = _mm512_cmp_ps_mask(_mm512_set1_ps(static_cast<float>(k)), lv, _CMP_LE_OQ);
      mx = _mm512_mask_max_ps(mx, seen, mx, _mm512_loadu_ps(ST + k * Rp + 16 * v));
    }
    const __m512 m_old = _mm512_loadu_ps(m + 16 * v);
    const __m512 m_new = _mm512_max_ps(m_old, mx);
    const __mmask16 live = _mm512_cmp_ps_mask(m_new, ninf, _CMP_NEQ_OQ);  // rows that have seen a key
    // exp(m_old - m_new): 1 where the maximum did not move, 0 where m_old was -inf
    const __m512 c = _mm512_mask_blend_ps(live, _mm512_set1_ps(1.f), exp16(_mm512_sub_ps(m_old, m_new)));
    _mm512_storeu_ps(corr + 16 * v, c);
    _mm512_storeu_ps(m + 16 * v, m_new);
    __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(l + 16 * v), c);
    for (int64_t k = 0; k < n; ++k) {
      const __mmask16 seen =
          _mm512_cmp_ps_mask(_mm512_set1_ps(static_cast<float>(k)), lv, _CMP_LE_OQ) & live;
      const __m512 p = _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(_mm512_loadu_ps(ST + k * Rp + 16 * v), m_new)));
      _mm512_storeu_ps(ST + k * Rp + 16 * v, p);
      sum = _mm512_add_ps(sum, p);
    }
    _mm512_storeu_ps(l + 16 * v, sum);
  }
  int64_t r = 0;  // value sums, two rows per pass
  for (; r + 2 <= R; r += 2) value_rows<2>(ST, Rp, vt, n, Dh, lim, corr, r, acc);
  if (r < R) value_rows<1>(ST, Rp, vt, n, Dh, lim, corr, r, acc);
}
static bool has_avx512f() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}
static const bool kPrefillAvx512 = has_avx512f();
#else
static const bool kPrefillAvx512 = false;
#endif

// The partial states of an item's rows: m [rows], l [rows], acc [rows, Dh] in one buffer.
template <typename F>  // float, or const float to read
struct DenseState {
  F *m, *l, *acc;
  DenseState(F* base, int64_t rows) : m(base), l(base + rows), acc(base + 2 * rows) {}
};
static inline int64_t dense_state_floats(int64_t rows, int64_t Dh) { return rows * (Dh + 2); }

// attend_dense's prefill path on AVX-512 (dense_tile_rows_avx512): the item's rows as lanes.
template <typename KV>
static void dense_rows_avx512(const AttnProblem& P, const AttnItem& it, int64_t ja, int64_t jb,
                              const Rows<const KV>& keys, const Rows<const KV>& vals, const DenseState<float>& st) {
#if defined(__GNUC__) && defined(__x86_64__)
  const int64_t len = P.lens[it.b], Dh = P.Dh, R = (it.s1 - it.s0) * it.nh, Rp = (R + 15) / 16 * 16;
  Scratch& sc = scratch();
  sc.qT.assign(Dh * Rp, 0.f), sc.rowvec.assign(4 * Rp, 0.f), sc.tile.resize(kTile * Rp);
  float *mv = sc.rowvec.data(), *lv = mv + Rp, *lim = lv + Rp, *corr = lim + Rp;
  for (int64_t r = 0; r < R; ++r) {  // query rows, scaled, as columns
    const float* src = P.q + ((it.b * P.S + it.s0 + r / it.nh) * P.H + it.h0 + r % it.nh) * Dh;
    for (int64_t d = 0; d < Dh; ++d) sc.qT[d * Rp + r] = src[d] * P.scale;
  }
  std::fill(mv, mv + Rp, kNegInf);
  for (int64_t j0 = ja, n = 0; j0 < jb; j0 += n) {
    n = std::min({kTile, jb - j0, keys.run(j0), vals.run(j0)});  // a tile never crosses a page
    for (int64_t r = 0; r < Rp; ++r)  // the tile's last key row r sees (-1: none)
      lim[r] = r < R ? static_cast<float>(std::max<int64_t>(-1, len + it.s0 + r / it.nh - j0)) : -1.f;
    const float* kt = tile_as_float(keys.row(j0), n, n, Dh, sc.ktile);
    const float* vt = tile_as_float(vals.row(j0), n, n, Dh, sc.vtile);
    dense_tile_rows_avx512(sc.qT.data(), R, Rp, kt, vt, n, Dh, lim, mv, lv, st.acc, sc.tile.data(), corr);
  }
  std::copy(mv, mv + R, st.m), std::copy(lv, lv + R, st.l);
#else
  (void)P, (void)it, (void)ja, (void)jb, (void)keys, (void)vals, (void)st;
#endif
}

// Dense mode: every visible key, for flagged sequences (a speculative verification, or a
// prefill / decode step the engine runs densely) and for nodes whose top-k keeps every key
// (a dense export, a sparse model's dense layers). One item holds every head
// of a KV head's group for a chunk of queries (rows r = (query s0 + r / nh, head h0 + r %
// nh)) and one span of keys [ja, jb): each key and value tile is widened once and used by
// all rows, and splitting the keys gives the pool work when there are few KV heads (as
// flash-decoding does). The item leaves each row's softmax state (m, l, unnormalised acc)
// for merge_dense, which combines the spans in key order.
template <typename KV>
RAGTOP_HOT static void attend_dense(const AttnProblem& P, const AttnItem& it, int64_t ja, int64_t jb, float* state) {
  const int64_t len = P.lens[it.b], Dh = P.Dh;
  const int64_t R = (it.s1 - it.s0) * it.nh;
  const DenseState st(state, R);
  float *m = st.m, *l = st.l, *acc = st.acc;
  const Rows<const KV> keys = P.kv(static_cast<const KV*>(P.kc), it.b, it.kvh);
  const Rows<const KV> vals = P.kv(static_cast<const KV*>(P.vc), it.b, it.kvh);
  std::fill(m, m + R, kNegInf), std::fill(l, l + R, 0.f), std::fill(acc, acc + R * Dh, 0.f);
  jb = std::min(jb, len + it.s1);  // no row sees a key past the last row's position
  if (ja >= jb) return;
  if (kPrefillAvx512 && P.S > 32 && Dh % 64 == 0) return dense_rows_avx512<KV>(P, it, ja, jb, keys, vals, st);

  Scratch& sc = scratch();
  sc.q.resize(R * Dh), sc.tile.resize(R * kTile);  // kTile is a multiple of 8: n8 <= kTile
  for (int64_t r = 0; r < R; ++r) {  // query rows, pre-multiplied by the softmax scale
    const float* src = P.q + ((it.b * P.S + it.s0 + r / it.nh) * P.H + it.h0 + r % it.nh) * Dh;
    for (int64_t d = 0; d < Dh; ++d) sc.q[r * Dh + d] = src[d] * P.scale;
  }
  float* tile = sc.tile.data();
  for (int64_t j0 = ja, n = 0; j0 < jb; j0 += n) {
    n = std::min({kTile, jb - j0, keys.run(j0), vals.run(j0)});  // a tile never crosses a page
    const int64_t r0 = std::max<int64_t>(0, j0 - len - it.s0) * it.nh;  // the rows that see key j0
    // scored in whole groups of 8 keys (zero rows pad the tile): a key's score, and so a
    // row's output, never depends on where the tile ends, i.e. on the other rows' positions
    const int64_t n8 = (n + 7) / 8 * 8;
    score_tile(sc.q.data() + r0 * Dh, R - r0, tile_as_float(keys.row(j0), n, n8, Dh, sc.ktile), n8, Dh, tile);
    const float* vt = tile_as_float(vals.row(j0), n, n, Dh, sc.vtile);
    for (int64_t r = r0; r < R; ++r) {
      const int64_t cnt = std::min(n, len + it.s0 + r / it.nh + 1 - j0);  // keys j0 .. p of this tile
      softmax_tile(tile + (r - r0) * n8, cnt, vt, Dh, m[r], l[r], acc + r * Dh);
    }
  }
}

// Row r's output from the states of nspans consecutive key spans (`stride` floats apart),
// combined in key order: each span's acc and l scaled by exp(its m - the overall maximum).
static void merge_dense(const float* spans, int64_t nspans, int64_t stride, int64_t rows, int64_t Dh, int64_t r,
                        float* out) {
  float mx = kNegInf;
  for (int64_t i = 0; i < nspans; ++i) mx = std::max(mx, DenseState(spans + i * stride, rows).m[r]);
  std::fill(out, out + Dh, 0.f);
  if (mx == kNegInf) return;
  float total = 0.f;
  for (int64_t i = 0; i < nspans; ++i) {
    const DenseState st(spans + i * stride, rows);
    if (st.m[r] == kNegInf) continue;  // a span this row does not see
    const float w = std::exp(st.m[r] - mx);
    total += w * st.l[r];
    const float* a = st.acc + r * Dh;
    for (int64_t d = 0; d < Dh; ++d) out[d] += w * a[d];
  }
  const float inv = 1.f / total;
  for (int64_t d = 0; d < Dh; ++d) out[d] *= inv;
}

// Block mode: per row, rank the earlier blocks by their upper bound (reads only the
// block summaries), keep `budget` of them plus the own block, then exact top-k over the
// keys of the chosen blocks in increasing key order.
template <typename KV>
RAGTOP_HOT static void attend_blocks(const AttnProblem& P, const AttnItem& it) {
  const int64_t len = P.lens[it.b], Dh = P.Dh, bs = P.bs;
  const Rows<const KV> keys = P.kv(static_cast<const KV*>(P.kc), it.b, it.kvh);
  const Rows<const KV> vals = P.kv(static_cast<const KV*>(P.vc), it.b, it.kvh);
  const Rows<const float> lo = P.summary(P.kmin, it.b, it.kvh), hi = P.summary(P.kmax, it.b, it.kvh);

  Scratch& sc = scratch();
  const int64_t budget = std::min(P.budget, P.nb);  // a budget >= nb keeps every block
  const int64_t kcap = std::min<int64_t>(P.topk, (budget + 1) * bs);
  sc.cand.resize(TopK::capacity(kcap)), sc.bcand.resize(TopK::capacity(budget));
  sc.blocks.resize(budget + 1), sc.q.resize(Dh);
  sc.forced.resize(std::min(P.C, P.sink + P.window));
  sc.tile.resize(kTile), sc.row.resize(Dh);
  float* tile = sc.tile.data();
  TopK keysel, blocksel;

  for (int64_t s = it.s0; s < it.s1; ++s) {
    const int64_t p = len + s, own = p / bs;
    for (int64_t h = it.h0; h < it.h0 + it.nh; ++h) {
      const float* q = P.q + ((it.b * P.S + s) * P.H + h) * Dh;
      float* qs = sc.q.data();  // scaled copy for the key scores (the bound uses q as is)
      for (int64_t d = 0; d < Dh; ++d) qs[d] = q[d] * P.scale;
      // 1. candidate blocks: the budget eligible earlier blocks with the largest bound;
      //    eligible = holding a candidate key, sink <= j <= free_hi
      const int64_t free_hi = p - P.window;
      const int64_t blo = P.sink / bs, bhi = free_hi >= P.sink ? std::min(own - 1, free_hi / bs) : -1;
      blocksel.reset(sc.bcand.data(), std::min(budget, std::max<int64_t>(0, bhi - blo + 1)));
      for (int64_t blk = blo; blk <= bhi; ++blk) {  // hot loop over the summaries
        const float ub = block_bound(q, lo.row(blk), hi.row(blk), Dh);
        if (ub > blocksel.thr) blocksel.push(ub, static_cast<int32_t>(blk));
      }
      int32_t* blocks = sc.blocks.data();
      blocksel.compact();
      for (int32_t i = 0; i < blocksel.n; ++i) blocks[i] = blocksel.c[i].j;
      std::sort(blocks, blocks + blocksel.n);  // key order, for the tie rule below
      int64_t nblk = blocksel.n;
      blocks[nblk++] = static_cast<int32_t>(own);
      // 2. exact top-k over the candidates of the chosen blocks: [j0, j1) per block
      auto span = [&](int64_t blk, int64_t& j0, int64_t& j1) {
        j0 = std::max(blk * bs, P.sink), j1 = std::min({(blk + 1) * bs, p + 1, free_hi + 1});
      };
      int64_t nkeys = 0, j0, j1;
      for (int64_t bi = 0; bi < nblk; ++bi) span(blocks[bi], j0, j1), nkeys += std::max<int64_t>(0, j1 - j0);
      float* out = P.out + ((it.b * P.S + s) * P.H + h) * Dh;
      keysel.reset(sc.cand.data(), std::min<int64_t>(P.topk, nkeys));
      for (int64_t bi = 0; bi < nblk; ++bi) {
        span(blocks[bi], j0, j1);
        for (int64_t t0 = j0, n = 0; t0 < j1; t0 += n) {
          n = std::min({kTile, j1 - t0, keys.run(t0)});
          score_tile(qs, 1, keys.row(t0), n, Dh, tile);
          select_scores(keysel, tile, n, t0);
        }
      }
      const int64_t nf = forced_keys(qs, keys, Dh, p, P.sink, P.window, sc.forced.data(), sc.row.data());
      softmax_gather(keysel, vals, Dh, out, sc.forced.data(), nf, sc.row.data());
    }
  }
}

// ---------------------------------------------------------------------------------------
// Running `fn(i)` for i in [0, n) on onnxruntime's intra-op pool.
template <typename F>
static void parallel_for(OrtKernelContext* ctx, size_t n, F&& fn) {
  if (n == 0) return;
  if (n == 1) return fn(size_t{0});
  struct Thunk {
    F* f;
    static void call(void* self, size_t i) { (*static_cast<Thunk*>(self)->f)(i); }
  } thunk{&fn};
  Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(ctx, &Thunk::call, n, 0, &thunk));
}

static int64_t attr_int(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t dflt, bool required) {
  int64_t v = dflt;
  OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, &v);
  if (st) {
    api->ReleaseStatus(st);
    if (required) ORT_CXX_API_THROW(std::string("ragtop::TopKAttention: missing attribute ") + name, ORT_INVALID_ARGUMENT);
    return dflt;
  }
  return v;
}

static std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

#define RAGTOP_CHECK(cond, msg)                                                        \
  do {                                                                                 \
    if (!(cond)) return Ort::Status((std::string("ragtop::") + (msg)).c_str(), ORT_INVALID_ARGUMENT); \
  } while (0)

// ---------------------------------------------------------------------------------------
// CacheT: the ORT element type of past/present key/value (float, or Ort::Float16_t for a
// float16 cache: one registration each, same op name); KV: how the kernels see it.
template <typename CacheT>
struct TopKAttentionKernel {
  using KV = std::conditional_t<std::is_same_v<CacheT, float>, float, Half>;
  static_assert(sizeof(CacheT) == sizeof(KV), "cache element size");
  int64_t num_heads, num_kv_heads, topk, block_size, block_budget, sink_tokens, local_window;
  float scale;

  TopKAttentionKernel(const OrtApi* api, const OrtKernelInfo* info) {
    num_heads = attr_int(api, info, "num_heads", 0, true);
    num_kv_heads = attr_int(api, info, "num_kv_heads", 0, true);
    topk = attr_int(api, info, "topk", 0, true);
    block_size = attr_int(api, info, "block_size", 0, false);
    block_budget = attr_int(api, info, "block_budget", 0, false);
    sink_tokens = attr_int(api, info, "sink_tokens", 0, false);  // absent in older files: 0
    local_window = attr_int(api, info, "local_window", 0, false);
    OrtStatus* st = api->KernelInfoGetAttribute_float(info, "scale", &scale);
    if (st) {
      api->ReleaseStatus(st);
      ORT_CXX_API_THROW("ragtop::TopKAttention: missing attribute scale", ORT_INVALID_ARGUMENT);
    }
    if (num_heads < 1 || num_kv_heads < 1 || num_heads % num_kv_heads)
      ORT_CXX_API_THROW("ragtop::TopKAttention: num_heads must be a positive multiple of num_kv_heads", ORT_INVALID_ARGUMENT);
    if (topk < 1) ORT_CXX_API_THROW("ragtop::TopKAttention: topk must be >= 1", ORT_INVALID_ARGUMENT);
    if (sink_tokens < 0 || local_window < 0)
      ORT_CXX_API_THROW("ragtop::TopKAttention: sink_tokens and local_window must be >= 0", ORT_INVALID_ARGUMENT);
    if (block_size < 0 || (block_size > 0 && block_budget < 1))
      ORT_CXX_API_THROW("ragtop::TopKAttention: block_size > 0 needs block_budget >= 1", ORT_INVALID_ARGUMENT);
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& query, const Tensor<float>& key,
                      const Tensor<float>& value, const Tensor<CacheT>& past_key,
                      const Tensor<CacheT>& past_value, const Tensor<int64_t>& past_lengths,
                      std::optional<const Tensor<float>*> past_key_min,
                      std::optional<const Tensor<float>*> past_key_max,
                      std::optional<const Tensor<int64_t>*> attention_dense,
                      std::optional<const Tensor<int64_t>*> block_table, Tensor<float>& output,
                      Tensor<CacheT>& present_key, Tensor<CacheT>& present_value,
                      std::optional<Tensor<float>*> present_key_min,
                      std::optional<Tensor<float>*> present_key_max) {
    try {
      return run(ctx, query, key, value, past_key, past_value, past_lengths, past_key_min, past_key_max,
                 attention_dense, block_table, output, present_key, present_value, present_key_min,
                 present_key_max);
    } catch (const std::exception& e) {
      return Ort::Status(e);
    }
  }

  Ort::Status run(OrtKernelContext* ctx, const Tensor<float>& query, const Tensor<float>& key,
                  const Tensor<float>& value, const Tensor<CacheT>& past_key,
                  const Tensor<CacheT>& past_value, const Tensor<int64_t>& past_lengths,
                  std::optional<const Tensor<float>*> past_key_min,
                  std::optional<const Tensor<float>*> past_key_max,
                  std::optional<const Tensor<int64_t>*> attention_dense,
                  std::optional<const Tensor<int64_t>*> block_table, Tensor<float>& output,
                  Tensor<CacheT>& present_key, Tensor<CacheT>& present_value,
                  std::optional<Tensor<float>*> present_key_min,
                  std::optional<Tensor<float>*> present_key_max) const {
    const auto& qs = query.Shape();
    const auto& cs = past_key.Shape();
    RAGTOP_CHECK(qs.size() == 3 && cs.size() == 4, "TopKAttention: query must be [B,S,H*Dh] and past_key [B,Hkv,C,Dh], got " +
                                                        shape_str(qs) + " and " + shape_str(cs));
    AttnProblem P{};
    P.B = qs[0], P.S = qs[1], P.H = num_heads, P.Hkv = num_kv_heads, P.G = num_heads / num_kv_heads;
    P.Dh = cs[3], P.C = cs[2], P.topk = topk, P.bs = block_size, P.budget = block_budget, P.scale = scale;
    // paged cache: past_key is a pool [N, Hkv, P, Dh]; sequence b's rows are found through
    // block_table [B, M] (capacity M * P). An empty table ([B, 0] or [0]) = contiguous.
    const bool paged = block_table && (*block_table)->NumberOfElement() > 0;
    if (paged) {
      const auto& ts = (*block_table)->Shape();
      RAGTOP_CHECK(ts.size() == 2 && ts[0] == P.B, "TopKAttention: block_table must be [B, max_pages], got " + shape_str(ts));
      P.block_table = (*block_table)->Data(), P.M = ts[1], P.page = cs[2], P.C = ts[1] * cs[2];
      RAGTOP_CHECK(block_size <= 0 || P.page % block_size == 0, "TopKAttention: page size " + std::to_string(P.page) +
                                                                    " is not a multiple of block_size " + std::to_string(block_size));
    }
    P.sink = sink_tokens, P.window = local_window;
    RAGTOP_CHECK(qs[2] == P.H * P.Dh, "TopKAttention: query last dim " + std::to_string(qs[2]) + " != num_heads * head_dim = " +
                                          std::to_string(P.H * P.Dh));
    RAGTOP_CHECK((paged || cs[0] == P.B) && cs[1] == P.Hkv, "TopKAttention: past_key " + shape_str(cs) + " does not match batch " +
                                                     std::to_string(P.B) + " and num_kv_heads " + std::to_string(P.Hkv));
    const std::vector<int64_t> kvs{P.B, P.S, P.Hkv * P.Dh};
    RAGTOP_CHECK(key.Shape() == kvs && value.Shape() == kvs, "TopKAttention: key/value must be " + shape_str(kvs));
    RAGTOP_CHECK(past_value.Shape() == cs, "TopKAttention: past_value must have past_key's shape " + shape_str(cs));
    RAGTOP_CHECK(past_lengths.Shape() == std::vector<int64_t>{P.B}, "TopKAttention: past_lengths must be [B]");
    const int64_t* lens = past_lengths.Data();
    for (int64_t b = 0; b < P.B; ++b)
      RAGTOP_CHECK(lens[b] >= 0 && lens[b] + P.S <= P.C, "TopKAttention: sequence " + std::to_string(b) + " holds " +
                                                             std::to_string(lens[b]) + " tokens; + " + std::to_string(P.S) +
                                                             " new exceeds the cache capacity " + std::to_string(P.C));
    if (paged)  // every page a write or a read may touch must be in the pool
      for (int64_t b = 0; b < P.B; ++b)
        for (int64_t i = 0; i < (lens[b] + P.S + P.page - 1) / P.page; ++i) {
          const int64_t pg = P.block_table[b * P.M + i];
          RAGTOP_CHECK(pg >= 0 && pg < cs[0], "TopKAttention: block_table[" + std::to_string(b) + ", " + std::to_string(i) +
                                                  "] = " + std::to_string(pg) + " is not a page of the pool of " +
                                                  std::to_string(cs[0]));
        }
    // attention_dense[b] != 0: sequence b attends densely (a speculative verification pass);
    // shape [B], or [1]: one flag for every sequence (the graph's default)
    std::vector<char> dense;
    if (attention_dense) {
      const auto& fs = (*attention_dense)->Shape();
      RAGTOP_CHECK(fs.size() == 1 && (fs[0] == P.B || fs[0] == 1),
                   "TopKAttention: attention_dense must be [B] or [1], got " + shape_str(fs));
      const int64_t* f = (*attention_dense)->Data();
      for (int64_t b = 0; b < P.B; ++b) dense.push_back(f[fs[0] == 1 ? 0 : b] != 0);
    }
    const bool blocks = block_size > 0;
    std::vector<int64_t> sum_shape;
    if (blocks) {
      RAGTOP_CHECK(P.C % P.bs == 0, "TopKAttention: cache capacity " + std::to_string(P.C) + " is not a multiple of block_size " +
                                        std::to_string(P.bs));
      P.nb = P.C / P.bs;
      sum_shape = paged ? std::vector<int64_t>{cs[0], P.Hkv, P.page / P.bs, P.Dh} : std::vector<int64_t>{P.B, P.Hkv, P.nb, P.Dh};
      RAGTOP_CHECK(past_key_min && past_key_max && present_key_min && present_key_max,
                   "TopKAttention: block_size > 0 needs inputs past_key_min/max and outputs present_key_min/max");
      RAGTOP_CHECK((*past_key_min)->Shape() == sum_shape && (*past_key_max)->Shape() == sum_shape,
                   "TopKAttention: past_key_min/max must be " + shape_str(sum_shape));
    }

    // Outputs. With IO binding, present_* may be the very buffers of past_*: then only the
    // new positions are written. Otherwise copy past -> present first.
    float* out = output.Allocate(qs);
    KV* kc = reinterpret_cast<KV*>(present_key.Allocate(cs));
    KV* vc = reinterpret_cast<KV*>(present_value.Allocate(cs));
    const size_t cache_bytes = static_cast<size_t>(cs[0] * cs[1] * cs[2] * cs[3]) * sizeof(KV);
    if (static_cast<const void*>(kc) != past_key.Data()) std::memcpy(kc, past_key.Data(), cache_bytes);
    if (static_cast<const void*>(vc) != past_value.Data()) std::memcpy(vc, past_value.Data(), cache_bytes);
    float *lo = nullptr, *hi = nullptr;
    if (blocks) {
      lo = (*present_key_min)->Allocate(sum_shape);
      hi = (*present_key_max)->Allocate(sum_shape);
      const size_t sum_bytes = static_cast<size_t>(sum_shape[0] * sum_shape[1] * sum_shape[2] * sum_shape[3]) * sizeof(float);
      if (lo != (*past_key_min)->Data()) std::memcpy(lo, (*past_key_min)->Data(), sum_bytes);
      if (hi != (*past_key_max)->Data()) std::memcpy(hi, (*past_key_max)->Data(), sum_bytes);
    }
    P.q = query.Data(), P.lens = lens, P.kc = kc, P.vc = vc, P.kmin = lo, P.kmax = hi, P.out = out;
    if (P.S == 0) return Ort::Status(nullptr);

    // 1. Append the new keys/values (and fold them into the block summaries), one
    //    (sequence, KV head) per item; positions within an item are in order.
    const float* knew = key.Data();
    const float* vnew = value.Data();
    parallel_for(ctx, static_cast<size_t>(P.B * P.Hkv), [&](size_t i) {
      const int64_t b = static_cast<int64_t>(i) / P.Hkv, h = static_cast<int64_t>(i) % P.Hkv;
      std::vector<float>& row = scratch().row;
      row.resize(P.Dh);
      const Rows<KV> kd = P.kv(kc, b, h), vd = P.kv(vc, b, h);
      for (int64_t s = 0; s < P.S; ++s) {
        const int64_t pos = lens[b] + s;
        KV* kdst = kd.row(pos);
        store_row(knew + ((b * P.S + s) * P.Hkv + h) * P.Dh, P.Dh, kdst);  // a half cache rounds here
        store_row(vnew + ((b * P.S + s) * P.Hkv + h) * P.Dh, P.Dh, vd.row(pos));
        if (blocks) {  // the summaries bound the keys as stored (rounded), read back
          const float* ksrc = as_float(kdst, P.Dh, row.data());
          float* l = P.summary(lo, b, h).row(pos / P.bs);
          float* u = P.summary(hi, b, h).row(pos / P.bs);
          if (pos % P.bs == 0) {  // a block whose first key is new starts afresh
            std::memcpy(l, ksrc, P.Dh * sizeof(float));
            std::memcpy(u, ksrc, P.Dh * sizeof(float));
          } else {
            for (int64_t d = 0; d < P.Dh; ++d) l[d] = std::min(l[d], ksrc[d]), u[d] = std::max(u[d], ksrc[d]);
          }
        }
      }
    });

    // 2. Attention. Dense sequences (flagged, or all of them when the top-k and the block
    //    budget keep every key: a dense export, a sparse model's dense layers) take dense items: (sequence, KV head, query chunk, key span), every
    //    head of the group. Spans are 512 keys at fixed positions while a call has at most 32
    //    queries (decode steps and verifications; 2048 for prefill chunks), so a row's sums
    //    do not depend on how many rows share the call: a verification's rows add up exactly
    //    as the same positions decoded one at a time.
    const bool all_dense = P.topk >= P.C && (!blocks || P.budget >= P.nb);  // keeps every key (a dense layer)
    auto is_dense = [&](int64_t b) { return all_dense || (!dense.empty() && dense[b]); };
    const int64_t dq = std::max<int64_t>(1, 96 / P.G);  // queries per dense chunk: <= 96 rows of state
    const int64_t span = P.S <= 32 ? 512 : 2048;
    struct DenseItem {
      AttnItem it;
      int64_t ja, jb;  // keys
    };
    struct DenseGroup {
      AttnItem it;
      int64_t first, nspans;
    };
    std::vector<DenseItem> ditems;
    std::vector<DenseGroup> dgroups;
    for (int64_t b = 0; b < P.B; ++b) {
      if (!is_dense(b)) continue;
      for (int64_t kvh = 0; kvh < P.Hkv; ++kvh)
        for (int64_t s0 = 0; s0 < P.S; s0 += dq) {
          const AttnItem it{b, kvh, kvh * P.G, P.G, s0, std::min(P.S, s0 + dq)};
          const int64_t visible = lens[b] + it.s1;  // keys [0, visible) for the chunk's last row
          const DenseGroup g{it, static_cast<int64_t>(ditems.size()), (visible + span - 1) / span};
          for (int64_t i = 0; i < g.nspans; ++i)
            ditems.push_back({it, i * span, std::min(visible, (i + 1) * span)});
          dgroups.push_back(g);
        }
    }
    const int64_t stride = dense_state_floats(dq * P.G, P.Dh);
    std::vector<float> states(ditems.size() * static_cast<size_t>(stride));

    //    Other sequences: (sequence, KV head, head group, query chunk). Prefill chunks hold
    //    up to 32 queries (bounded scratch: rows x 2k candidates); when there are too few
    //    items to keep the pool busy (decode with few KV heads), the GQA group is split into
    //    single heads.
    const int64_t kmax_entries = std::min<int64_t>(P.topk, P.C);
    int64_t qc = std::clamp<int64_t>((int64_t{1} << 21) / std::max<int64_t>(1, P.G * kmax_entries), 1, 32);
    if (blocks) qc = 16;
    const int64_t nchunks = (P.S + qc - 1) / qc;
    const int64_t hw = std::max<int64_t>(2, std::thread::hardware_concurrency());
    const int64_t nh = (P.B * P.Hkv * nchunks < 2 * hw) ? 1 : P.G;
    const int64_t groups = P.G / nh;
    const int64_t total = all_dense ? 0 : P.B * P.Hkv * groups * nchunks;
    const int64_t nd = static_cast<int64_t>(ditems.size());
    parallel_for(ctx, static_cast<size_t>(nd + total), [&](size_t i) {
      if (static_cast<int64_t>(i) < nd) {
        const DenseItem& d = ditems[i];
        return attend_dense<KV>(P, d.it, d.ja, d.jb, states.data() + i * stride);
      }
      int64_t r = static_cast<int64_t>(i) - nd;
      // the last chunks (longest causal spans) first, for load balance
      const int64_t c = nchunks - 1 - r % nchunks;
      r /= nchunks;
      const int64_t g = r % groups;
      r /= groups;
      const int64_t kvh = r % P.Hkv, b = r / P.Hkv;
      if (is_dense(b)) return;  // a dense item's
      const AttnItem it{b, kvh, kvh * P.G + g * nh, nh, c * qc, std::min(P.S, (c + 1) * qc)};
      if (blocks)
        attend_blocks<KV>(P, it);
      else
        attend_exact<KV>(P, it);
    });
    //    Dense outputs: each row's spans combined
    parallel_for(ctx, dgroups.size(), [&](size_t gi) {
      const DenseGroup& g = dgroups[gi];
      const int64_t rows = (g.it.s1 - g.it.s0) * g.it.nh;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t s = g.it.s0 + r / g.it.nh, h = g.it.h0 + r % g.it.nh;
        merge_dense(states.data() + g.first * stride, g.nspans, stride, rows, P.Dh, r,
                    P.out + ((g.it.b * P.S + s) * P.H + h) * P.Dh);
      }
    });
    return Ort::Status(nullptr);
  }
};

// ---------------------------------------------------------------------------------------
// RaggedEmbedding: out[b, s] = proj_i @ table_i[row_of[id]] for the tier i of id.
RAGTOP_HOT static void embed_token(const float* __restrict row, const float* __restrict proj, int64_t D, int64_t d,
                                   float* __restrict out) {
  for (int64_t o = 0; o < D; ++o) out[o] = dot(proj + o * d, row, d);  // proj: [D, d]
}

struct RaggedEmbeddingKernel {
  int64_t num_tiers;

  RaggedEmbeddingKernel(const OrtApi* api, const OrtKernelInfo* info) {
    num_tiers = attr_int(api, info, "num_tiers", 0, true);
    if (num_tiers < 1) ORT_CXX_API_THROW("ragtop::RaggedEmbedding: num_tiers must be >= 1", ORT_INVALID_ARGUMENT);
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<int64_t>& input_ids, const Tensor<int64_t>& tier_of,
                      const Tensor<int64_t>& row_of, const Ort::Custom::Variadic& weights, Tensor<float>& output) {
    try {
      RAGTOP_CHECK(weights.Size() == static_cast<size_t>(2 * num_tiers),
                   "RaggedEmbedding: expected " + std::to_string(2 * num_tiers) + " weight inputs (table, proj per tier), got " +
                       std::to_string(weights.Size()));
      const int64_t V = tier_of.NumberOfElement();
      RAGTOP_CHECK(row_of.NumberOfElement() == V, "RaggedEmbedding: tier_of and row_of must have the same length");
      std::vector<const float*> tables(num_tiers), projs(num_tiers);
      std::vector<int64_t> rows(num_tiers), widths(num_tiers);
      int64_t D = -1;
      for (int64_t i = 0; i < num_tiers; ++i) {
        const auto* tp = dynamic_cast<const Tensor<float>*>(weights[2 * i].get());
        const auto* pp = dynamic_cast<const Tensor<float>*>(weights[2 * i + 1].get());
        RAGTOP_CHECK(tp && pp, "RaggedEmbedding: tables and projections must be float");
        const auto& t = *tp;
        const auto& p = *pp;
        const auto ts = t.Shape(), ps = p.Shape();
        RAGTOP_CHECK(ts.size() == 2 && ps.size() == 2 && ps[1] == ts[1] && (D < 0 || ps[0] == D),
                     "RaggedEmbedding: tier " + std::to_string(i) + " table " + shape_str(ts) + " / proj " + shape_str(ps) +
                         " must be [n_i, d_i] / [D, d_i]");
        D = ps[0];
        tables[i] = t.Data(), projs[i] = p.Data();
        rows[i] = ts[0], widths[i] = ts[1];
      }
      const auto& ids_shape = input_ids.Shape();
      std::vector<int64_t> out_shape(ids_shape);
      out_shape.push_back(D);
      float* out = output.Allocate(out_shape);
      const int64_t n = input_ids.NumberOfElement();
      const int64_t* ids = input_ids.Data();
      const int64_t* tier = tier_of.Data();
      const int64_t* row = row_of.Data();
      for (int64_t t = 0; t < n; ++t) {  // validate before any thread starts
        const int64_t id = ids[t];
        RAGTOP_CHECK(id >= 0 && id < V, "RaggedEmbedding: token id " + std::to_string(id) + " out of range [0, " +
                                            std::to_string(V) + ")");
        RAGTOP_CHECK(tier[id] >= 0 && tier[id] < num_tiers && row[id] >= 0 && row[id] < rows[tier[id]],
                     "RaggedEmbedding: token " + std::to_string(id) + " has an invalid tier/row");
      }
      parallel_for(ctx, static_cast<size_t>(n), [&](size_t t) {
        const int64_t id = ids[t], i = tier[id];
        embed_token(tables[i] + row[id] * widths[i], projs[i], D, widths[i], out + static_cast<int64_t>(t) * D);
      });
      return Ort::Status(nullptr);
    } catch (const std::exception& e) {
      return Ort::Status(e);
    }
  }
};

// ---------------------------------------------------------------------------------------
// MatMulBlocks: y = x @ W^T for a block-quantized W in MatMulNBits' layout (ops.py), with
// the per-block minimum term of Q4_1 blocks fused in. What it computes is what the node's
// function body (com.microsoft::MatMulNBits + the minima subgraph) computes:
//
//   level 4:  x is rounded per row and block of 32 to int8 as MLAS's CompInt8 path rounds
//             it (scale = amax / 127, codes = round-half-even(x * (127 / amax))), each
//             block's integer dot product with the codes is exact, and
//             y = sum_b scale_w * scale_x * (sum_i q_i xq_i - zp * sum_i xq_i)
//                 + sum_b mins[b, n] * sum_i x_i          (the fp32, unrounded input)
//   level 0:  fp32 on the dequantised weights: y = sum_k x_k (scale (q_k - zp) + min).
//
// Equal to the body up to float summation order. Speed: MatMulNBits unpacks every weight
// block again for every row of x; here each block is unpacked once per tile of up to 8
// rows and applied to all of them (decode M = 1, speculative verification M = 5, prefill
// chunks M = 256 alike), the columns split over onnxruntime's thread pool. The level-4
// inner loop uses AVX-512 VNNI (vpdpbusd: unsigned codes times signed int8 input, four
// products per 32-bit lane) where the CPU has it; else, for 4-bit codes, the same at 256
// bits (AVX-VNNI, or AVX2 vpmaddubsw + vpmaddwd); else portable loops that the compiler
// vectorises (target_clones). Picked once at load time (isa(); no AMX).
namespace mmb {

constexpr int64_t kBlock = 32;
constexpr int64_t kMaxRows = 8;  // rows of x sharing one unpacked weight block

struct Weights {
  const uint8_t* codes;  // [N, nb, 32 * bits / 8]: 4-bit codes two per byte, low nibble first
  const float* scales;   // [N, nb]
  const uint8_t* zp;     // MatMulNBits' packing, or null: the default 2^(bits - 1)
  const float* mins;     // [nb, N], or null
  int64_t N, K, nb, bits;
  int64_t bytes_per_block() const { return kBlock * bits / 8; }
  int zero_point(int64_t n, int64_t b) const {
    if (!zp) return 1 << (bits - 1);
    if (bits == 8) return zp[n * nb + b];
    const uint8_t byte = zp[n * ((nb + 1) / 2) + b / 2];
    return (b & 1) ? byte >> 4 : byte & 0x0F;
  }
};

// The rounded input, prepared once per call. Portable path: `xq` [M, nb * 32] int8 in
// natural order. AVX-512 VNNI path: `pack`, one record per (group of 64 code bytes = 4 blocks
// of 4-bit codes or 2 of 8-bit, row m), laid out [M / 8 tiles][groups][8 rows]: a tile of
// rows reads one contiguous span, its rows at fixed offsets from one pointer:
//   4-bit: [64 B even elements of the 4 blocks][64 B odd elements][16 x int32 bias][16 x f32 scale]
//   8-bit: [64 B elements of the 2 blocks][16 x int32 bias][16 x f32 scale]
// Byte j of a packed 4-bit block holds elements 2j (low nibble) and 2j + 1 (high), so the
// low nibbles meet the even elements and the high nibbles the odd ones in the same 32-bit
// lane; a lane's bias is -zp * (the sum of the input values it meets) with the default zero
// point (explicit ones are corrected in finish()), its scale the block's input scale.
// Padding blocks of the last group are zero. The 256-bit paths use half-width records
// (prepare_256). Every path also gets the per-block scale, sum of xq and fp32 sum of x.
struct Act {
  int64_t M = 0, nb = 0, groups = 0, record = 0;
  std::vector<int8_t> xq;        // portable: [M, nb * 32]
  std::vector<uint8_t> storage;  // vector paths: [tiles, groups, 8, record], 64-byte aligned via pack
  uint8_t* pack = nullptr;
  std::vector<float> scale;      // [M, nb] input scale per block
  std::vector<int32_t> qsum;     // [M, nb] sum of the block's xq
  std::vector<float> xsum;       // [M, nb] fp32 sum of the block's (unrounded) x
};

static int64_t blocks_per_group(int64_t bits) { return bits == 4 ? 4 : 2; }

// Round row-block `x` (n <= 32 values, the rest zero) as MLAS does: the same two float
// operations, so the int8 values are bit for bit MatMulNBits' own.
static inline __attribute__((always_inline)) float round_block(const float* x, int64_t n, int8_t* q) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float inv = amax != 0.f ? 127.f / amax : 0.f;
  for (int64_t i = 0; i < kBlock; ++i) q[i] = i < n ? static_cast<int8_t>(std::nearbyint(x[i] * inv)) : 0;
  return amax / 127.f;
}

static void prepare_vnni(const float* x, int64_t M, const Weights& W, Act& a);

// The 256-bit records (4-bit codes; see RAGTOP_TILE256), with the portable rounding.
RAGTOP_HOT static void prepare_256(const float* x, int64_t M, const Weights& W, Act& a) {
  const int64_t nb = W.nb, K = W.K;
  const int32_t zp = W.zp ? 0 : 8;
  a.groups = (nb + 1) / 2, a.record = 128;
  const int64_t tiles = (M + kMaxRows - 1) / kMaxRows;
  a.storage.assign(tiles * a.groups * kMaxRows * a.record + 64, 0);
  a.pack = a.storage.data() + (64 - reinterpret_cast<uintptr_t>(a.storage.data()) % 64) % 64;
  a.scale.resize(M * nb);
  a.qsum.resize(M * nb);
  int8_t q[kBlock];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + b * kBlock;
      const int64_t n = std::min(kBlock, K - b * kBlock);
      float xs = 0.f;
      for (int64_t i = 0; i < n; ++i) xs += xb[i];
      a.xsum[m * nb + b] = xs;
      const float s = round_block(xb, n, q);
      int32_t sum = 0;
      for (int i = 0; i < kBlock; ++i) sum += q[i];
      a.scale[m * nb + b] = s, a.qsum[m * nb + b] = sum;
      const int64_t g = b / 2, p = b % 2;
      uint8_t* rec = a.pack + (((m / kMaxRows) * a.groups + g) * kMaxRows + m % kMaxRows) * a.record;
      int8_t* xq = reinterpret_cast<int8_t*>(rec);
      int32_t* bias = reinterpret_cast<int32_t*>(rec + 64);
      float* lane_scale = reinterpret_cast<float*>(rec + 96);
      for (int j = 0; j < 16; ++j) xq[p * 16 + j] = q[2 * j], xq[32 + p * 16 + j] = q[2 * j + 1];
      for (int l = 0; l < 4; ++l) {
        int32_t ls = 0;
        for (int j = 8 * l; j < 8 * l + 8; ++j) ls += q[j];
        bias[p * 4 + l] = -zp * ls;
        lane_scale[p * 4 + l] = s;
      }
    }
}

RAGTOP_HOT512 static void prepare(const float* x, int64_t M, const Weights& W, bool level4, bool vnni, Act& a,
                                  bool records256 = false) {
  const int64_t G = blocks_per_group(W.bits), nb = W.nb, K = W.K;
  a.M = M, a.nb = nb, a.groups = (nb + G - 1) / G;
  a.xsum.resize(M * nb);
  if (level4 && records256) return prepare_256(x, M, W, a);
  if (level4 && vnni) {
    a.scale.resize(M * nb);
    a.qsum.resize(M * nb);
    a.record = W.bits == 4 ? 256 : 192;
    const int64_t tiles = (M + kMaxRows - 1) / kMaxRows;
    a.storage.assign(tiles * a.groups * kMaxRows * a.record + 64, 0);
    a.pack = a.storage.data() + (64 - reinterpret_cast<uintptr_t>(a.storage.data()) % 64) % 64;
    return prepare_vnni(x, M, W, a);
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + b * kBlock;
      const int64_t n = std::min(kBlock, K - b * kBlock);
      float s = 0.f;
      for (int64_t i = 0; i < n; ++i) s += xb[i];
      a.xsum[m * nb + b] = s;
    }
  if (!level4) return;
  a.scale.resize(M * nb);
  a.qsum.resize(M * nb);
  if (vnni) {
    a.record = W.bits == 4 ? 256 : 192;
    const int64_t tiles = (M + kMaxRows - 1) / kMaxRows;
    a.storage.assign(tiles * a.groups * kMaxRows * a.record + 64, 0);
    a.pack = a.storage.data() + (64 - reinterpret_cast<uintptr_t>(a.storage.data()) % 64) % 64;
  } else {
    a.xq.assign(M * nb * kBlock, 0);
  }
  const int lanes_per_block = 16 / static_cast<int>(G);
  const int32_t zp = W.zp ? 0 : (1 << (W.bits - 1));
  int8_t q[kBlock];
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float s = round_block(x + m * K + b * kBlock, std::min(kBlock, K - b * kBlock), q);
      int32_t sum = 0;
      for (int i = 0; i < kBlock; ++i) sum += q[i];
      a.scale[m * nb + b] = s, a.qsum[m * nb + b] = sum;
      if (!vnni) {
        std::memcpy(a.xq.data() + (m * nb + b) * kBlock, q, kBlock);
        continue;
      }
      const int64_t g = b / G, p = b % G;
      uint8_t* rec = a.pack + (((m / kMaxRows) * a.groups + g) * kMaxRows + m % kMaxRows) * a.record;
      int8_t* xs = reinterpret_cast<int8_t*>(rec);
      int32_t* bias = reinterpret_cast<int32_t*>(rec + a.record - 128);
      float* lane_scale = reinterpret_cast<float*>(rec + a.record - 64);
      if (W.bits == 4) {
        for (int j = 0; j < 16; ++j) xs[p * 16 + j] = q[2 * j], xs[64 + p * 16 + j] = q[2 * j + 1];
      } else {
        std::memcpy(xs + p * kBlock, q, kBlock);
      }
      for (int l = 0; l < lanes_per_block; ++l) {
        int32_t ls = 0;  // the input values lane l of this block meets
        if (W.bits == 4)
          for (int j = 4 * l; j < 4 * l + 4; ++j) ls += q[2 * j] + q[2 * j + 1];
        else
          for (int j = 4 * l; j < 4 * l + 4; ++j) ls += q[j];
        bias[p * lanes_per_block + l] = -zp * ls;
        lane_scale[p * lanes_per_block + l] = s;
      }
    }
  }
}

// The terms after the block dot products, for rows [m0, m1) and columns [n0, n1):
// explicit zero points (level 4) and the per-block minima (both levels' x sums in fp32).
static void mins_avx512(const Weights& W, const Act& a, int64_t M, int64_t n0, int64_t n1, float* y);

RAGTOP_HOT512 static void finish(const Weights& W, const Act& a, bool level4, bool vnni, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                   float* y) {
  const int64_t N = W.N, nb = W.nb;
  if (level4 && W.zp) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = m0; m < m1; ++m) {
        float c = 0.f;
        for (int64_t b = 0; b < nb; ++b)
          c += W.scales[n * nb + b] * a.scale[m * nb + b] *
               static_cast<float>(-W.zero_point(n, b) * a.qsum[m * nb + b]);
        y[m * N + n] += c;
      }
  }
  if (W.mins && level4 && vnni) {
    mins_avx512(W, a, m1, n0, n1, y);
  } else if (W.mins && level4) {
    for (int64_t m = m0; m < m1; ++m) {
      float* __restrict yr = y + m * N;
      for (int64_t b = 0; b < nb; ++b) {
        const float s = a.xsum[m * nb + b];
        const float* __restrict mr = W.mins + b * N;
#pragma omp simd
        for (int64_t n = n0; n < n1; ++n) yr[n] += s * mr[n];
      }
    }
  }
}

// Portable level 4: each weight row unpacked once into int8 codes, then every row of x.
RAGTOP_HOT static void tile_int8_generic(const Weights& W, const Act& a, int64_t m0, int64_t m1, int64_t n0,
                                         int64_t n1, float* y) {
  const int64_t nb = W.nb, bpb = W.bytes_per_block(), row = nb * kBlock;
  std::vector<uint8_t> codes(nb * kBlock);
  std::vector<float> ws(nb);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* src = W.codes + n * nb * bpb;
    if (W.bits == 8) {
      std::memcpy(codes.data(), src, nb * kBlock);
    } else {
      for (int64_t j = 0; j < nb * 16; ++j) codes[2 * j] = src[j] & 0x0F, codes[2 * j + 1] = src[j] >> 4;
    }
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* xr = a.xq.data() + m * row;
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* c = codes.data() + b * kBlock;
        const int8_t* xb = xr + b * kBlock;
        int32_t d = 0;
#pragma omp simd reduction(+ : d)
        for (int i = 0; i < kBlock; ++i) d += static_cast<int32_t>(c[i]) * xb[i];
        if (!W.zp) d -= (1 << (W.bits - 1)) * a.qsum[m * nb + b];  // explicit zero points: finish()
        acc += W.scales[n * nb + b] * a.scale[m * nb + b] * static_cast<float>(d);
      }
      y[m * W.N + n] = acc;
    }
  }
}

// Level 0: a chunk of weight rows dequantised to fp32 (minima included), then every row of x.
RAGTOP_HOT static void tile_fp32(const Weights& W, const float* x, int64_t M, int64_t n0, int64_t n1, float* y) {
  const int64_t nb = W.nb, K = W.K, bpb = W.bytes_per_block();
  constexpr int64_t kChunk = 16;
  std::vector<float> w(kChunk * K);
  for (int64_t c0 = n0; c0 < n1; c0 += kChunk) {
    const int64_t c1 = std::min(n1, c0 + kChunk);
    for (int64_t n = c0; n < c1; ++n) {
      float* wr = w.data() + (n - c0) * K;
      const uint8_t* src = W.codes + n * nb * bpb;
      for (int64_t b = 0; b < nb; ++b) {
        const float s = W.scales[n * nb + b], z = static_cast<float>(W.zero_point(n, b));
        const float mn = W.mins ? W.mins[b * W.N + n] : 0.f;
        const int64_t len = std::min(kBlock, K - b * kBlock);
        for (int64_t i = 0; i < len; ++i) {
          const int64_t j = b * bpb + (W.bits == 8 ? i : i / 2);
          const int code = W.bits == 8 ? src[j] : ((i & 1) ? src[j] >> 4 : src[j] & 0x0F);
          wr[b * kBlock + i] = s * (static_cast<float>(code) - z) + mn;
        }
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = c0; n < c1; ++n) y[m * W.N + n] = dot(x + m * K, w.data() + (n - c0) * K, K);
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
#define RAGTOP_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

// Level 4 on AVX-512 VNNI: per weight row n, per group of 64 code bytes (4 blocks of 4-bit
// codes / 2 of 8-bit), the codes are loaded and unpacked once, then for each of R rows of x
// one or two vpdpbusd give 16 lanes of exact integer partial dot products (started from the
// lane's -zp * sum(xq)), converted and scaled by scale_w * scale_x into a float accumulator.
// One horizontal sum per (row, column) at the end.
// Four vectors' horizontal sums as one 128-bit vector [sum a0, sum a1, sum a2, sum a3].
RAGTOP_VNNI static inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m256 r0 = _mm256_add_ps(_mm512_castps512_ps256(a0), _mm512_extractf32x8_ps(a0, 1));
  const __m256 r1 = _mm256_add_ps(_mm512_castps512_ps256(a1), _mm512_extractf32x8_ps(a1, 1));
  const __m256 r2 = _mm256_add_ps(_mm512_castps512_ps256(a2), _mm512_extractf32x8_ps(a2, 1));
  const __m256 r3 = _mm256_add_ps(_mm512_castps512_ps256(a3), _mm512_extractf32x8_ps(a3, 1));
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(r0, r1), _mm256_hadd_ps(r2, r3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// One group of code bytes (64 per weight row: 4 blocks of 4-bit codes, 2 of 8-bit) of C
// weight rows against R rows of x (records at p + r * record); LAST: the partial last group.
template <int R, int C, int BITS, bool LAST>
RAGTOP_VNNI static inline __attribute__((always_inline)) void vnni_group(
    const uint8_t* const* cr, const float* const* sw, int64_t b0, const uint8_t* p, __m512 (&acc)[R][C],
    __mmask64 tail_codes, __mmask8 tail_scales, __m512i idx, __m512i low4) {
  constexpr int64_t bpb = kBlock * BITS / 8, rec = BITS == 4 ? 256 : 192, xbytes = rec - 128;
  __m512i lo[C], hi[C];
  __m512 s[C];
  for (int c = 0; c < C; ++c) {
    const __m512i code =
        LAST ? _mm512_maskz_loadu_epi8(tail_codes, cr[c] + b0 * bpb) : _mm512_loadu_si512(cr[c] + b0 * bpb);
    // a full group's G scales (4, or 2 for 8-bit codes: never read past the row's last block)
    const __m128 sv = LAST          ? _mm_maskz_loadu_ps(tail_scales, sw[c] + b0)
                      : BITS == 4 ? _mm_loadu_ps(sw[c] + b0)
                                  : _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sw[c] + b0)));
    s[c] = _mm512_permutexvar_ps(idx, _mm512_zextps128_ps512(sv));
    if constexpr (BITS == 4) {
      lo[c] = _mm512_and_si512(code, low4);
      hi[c] = _mm512_and_si512(_mm512_srli_epi16(code, 4), low4);
    } else {
      lo[c] = code;
    }
  }
  for (int r = 0; r < R; ++r) {
    const uint8_t* q = p + r * rec;
    const __m512i bias = _mm512_load_si512(q + xbytes);
    const __m512 xs = _mm512_load_ps(reinterpret_cast<const float*>(q + xbytes + 64));
    const __m512i x0 = _mm512_load_si512(q);
    for (int c = 0; c < C; ++c) {
      __m512i d = _mm512_dpbusd_epi32(bias, lo[c], x0);
      if constexpr (BITS == 4) d = _mm512_dpbusd_epi32(d, hi[c], _mm512_load_si512(q + 64));
      acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s[c], xs), acc[r][c]);
    }
  }
}

// R rows of x (a tile starting at m0, a multiple of kMaxRows) times C weight rows at a time
// (C = 4 for a single row of x: four columns share the loads of x and one 4-way reduction).
template <int R, int C, int BITS>
RAGTOP_VNNI static void tile_vnni(const Weights& W, const Act& a, int64_t m0, int64_t n0, int64_t n1, float* y) {
  constexpr int64_t G = BITS == 4 ? 4 : 2, bpb = kBlock * BITS / 8, lanes_per_block = 16 / G;
  constexpr int64_t rec = BITS == 4 ? 256 : 192;  // record: int8 x (128 bytes), bias, scale
  const int64_t nb = W.nb, N = W.N, groups = a.groups, full = nb / G, tail = nb - full * G;
  const int64_t step = kMaxRows * rec;  // one group further
  const uint8_t* tile = a.pack + (m0 / kMaxRows) * groups * step;
  const __mmask64 tail_codes = tail ? ((__mmask64{1} << (tail * bpb)) - 1) : 0;
  const __mmask8 tail_scales = static_cast<__mmask8>((1u << tail) - 1);
  alignas(64) int32_t idx_v[16];
  for (int i = 0; i < 16; ++i) idx_v[i] = i / static_cast<int>(lanes_per_block);
  const __m512i idx = _mm512_load_si512(idx_v);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  int64_t n = n0;
  for (; n + C <= n1; n += C) {
    const uint8_t* cr[C];
    const float* sw[C];
    for (int c = 0; c < C; ++c) cr[c] = W.codes + (n + c) * nb * bpb, sw[c] = W.scales + (n + c) * nb;
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    const uint8_t* p = tile;
    for (int64_t g = 0; g < full; ++g, p += step)
      vnni_group<R, C, BITS, false>(cr, sw, g * G, p, acc, tail_codes, tail_scales, idx, low4);
    if (tail) vnni_group<R, C, BITS, true>(cr, sw, full * G, p, acc, tail_codes, tail_scales, idx, low4);
    for (int r = 0; r < R; ++r) {
      float* yr = y + (m0 + r) * N + n;
      if constexpr (C == 4) {
        _mm_storeu_ps(yr, reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
      } else {
        for (int c = 0; c < C; ++c) yr[c] = _mm512_reduce_add_ps(acc[r][c]);
      }
    }
  }
  if (n < n1) tile_vnni<R, 1, BITS>(W, a, m0, n, n1, y);
}

template <int BITS>
static void rows_vnni(const Weights& W, const Act& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* y) {
  for (int64_t m = m0; m < m1; m += kMaxRows) {
    switch (std::min(kMaxRows, m1 - m)) {
      case 1: tile_vnni<1, 4, BITS>(W, a, m, n0, n1, y); break;
      case 2: tile_vnni<2, 2, BITS>(W, a, m, n0, n1, y); break;
      case 3: tile_vnni<3, 2, BITS>(W, a, m, n0, n1, y); break;
      case 4: tile_vnni<4, 2, BITS>(W, a, m, n0, n1, y); break;
      case 5: tile_vnni<5, 2, BITS>(W, a, m, n0, n1, y); break;
      case 6: tile_vnni<6, 2, BITS>(W, a, m, n0, n1, y); break;
      case 7: tile_vnni<7, 2, BITS>(W, a, m, n0, n1, y); break;
      default: tile_vnni<8, 2, BITS>(W, a, m, n0, n1, y); break;
    }
  }
}

// y[m, n0:n1] += sum_b xsum[m, b] * mins[b, n0:n1] (the minima term; mins is [nb, N]):
// 8 rows x 16 columns of accumulators, one load of a mins row and 8 broadcast FMAs per block.
RAGTOP_VNNI static void mins_avx512(const Weights& W, const Act& a, int64_t M, int64_t n0, int64_t n1, float* y) {
  const int64_t N = W.N, nb = W.nb;
  for (int64_t c = n0; c < n1; c += 16) {
    const __mmask16 k = n1 - c >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n1 - c)) - 1);
    for (int64_t m = 0; m < M; m += kMaxRows) {
      const int64_t R = std::min(kMaxRows, M - m);
      const float* xs = a.xsum.data() + m * nb;
      __m512 acc[kMaxRows];
      for (int r = 0; r < kMaxRows; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        const __m512 mn = _mm512_maskz_loadu_ps(k, W.mins + b * N + c);
        for (int r = 0; r < kMaxRows; ++r)
          if (r < R) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xs[r * nb + b]), mn, acc[r]);
      }
      for (int r = 0; r < R; ++r) {
        float* yr = y + (m + r) * N + c;
        _mm512_mask_storeu_ps(yr, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, yr), acc[r]));
      }
    }
  }
}

// prepare() for the VNNI path, vectorised: per block two 16-float loads, max |x|, the
// rounding (vrndscaleps to nearest even, as MLAS), the even/odd split by permutes.
RAGTOP_VNNI static void prepare_vnni(const float* x, int64_t M, const Weights& W, Act& a) {
  const int64_t G = blocks_per_group(W.bits), nb = W.nb, K = W.K;
  const int32_t zp = W.zp ? 0 : (1 << (W.bits - 1));
  alignas(64) int32_t ev[16], od[16];
  for (int i = 0; i < 16; ++i) ev[i] = 2 * i, od[i] = 2 * i + 1;
  const __m512i even_idx = _mm512_load_si512(ev), odd_idx = _mm512_load_si512(od);
  alignas(64) int32_t t[32];
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + b * kBlock;
      const int64_t n = std::min(kBlock, K - b * kBlock);
      const __mmask16 k0 = n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
      const __mmask16 k1 = n >= 32 ? static_cast<__mmask16>(0xFFFF)
                                   : (n > 16 ? static_cast<__mmask16>((1u << (n - 16)) - 1) : static_cast<__mmask16>(0));
      const __m512 v0 = _mm512_maskz_loadu_ps(k0, xb), v1 = _mm512_maskz_loadu_ps(k1, xb + 16);
      a.xsum[m * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const __m512 inv = _mm512_set1_ps(amax != 0.f ? 127.f / amax : 0.f);
      const float s = amax / 127.f;
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v0, inv), _MM_FROUND_TO_NEAREST_INT));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v1, inv), _MM_FROUND_TO_NEAREST_INT));
      a.scale[m * nb + b] = s;
      a.qsum[m * nb + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      const int64_t g = b / G, p = b % G;
      uint8_t* rec = a.pack + (((m / kMaxRows) * a.groups + g) * kMaxRows + m % kMaxRows) * a.record;
      int32_t* bias = reinterpret_cast<int32_t*>(rec + a.record - 128);
      float* lane_scale = reinterpret_cast<float*>(rec + a.record - 64);
      if (W.bits == 4) {
        const __m512i e = _mm512_permutex2var_epi32(q0, even_idx, q1), o = _mm512_permutex2var_epi32(q0, odd_idx, q1);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(rec + p * 16), _mm512_cvtepi32_epi8(e));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(rec + 64 + p * 16), _mm512_cvtepi32_epi8(o));
        _mm512_store_si512(t, _mm512_add_epi32(e, o));  // lane l of the block meets t[4l .. 4l+3]
        for (int l = 0; l < 4; ++l) {
          bias[p * 4 + l] = -zp * (t[4 * l] + t[4 * l + 1] + t[4 * l + 2] + t[4 * l + 3]);
          lane_scale[p * 4 + l] = s;
        }
      } else {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(rec + p * 32), _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(rec + p * 32 + 16), _mm512_cvtepi32_epi8(q1));
        _mm512_store_si512(t, q0);
        _mm512_store_si512(t + 16, q1);
        for (int l = 0; l < 8; ++l) {
          bias[p * 8 + l] = -zp * (t[4 * l] + t[4 * l + 1] + t[4 * l + 2] + t[4 * l + 3]);
          lane_scale[p * 8 + l] = s;
        }
      }
    }
  }
}

// Level 4 on AVX2 (vpmaddubsw + vpmaddwd) or AVX-VNNI (the 256-bit vpdpbusd), 4-bit codes:
// the AVX-512 design at half width. A group is 32 code bytes (2 blocks); records of 128
// bytes per (group, row): [32 B even elements][32 B odd][8 x int32 bias][8 x f32 scale],
// tiles of 8 rows contiguous. Without VNNI, codes (<= 15) times int8 input (|x| <= 127)
// summed in pairs, then the two nibbles' pairs, fit int16 (<= 4 * 15 * 127) exactly.
#define RAGTOP_TILE256(NAME, TARGET, DOT)                                                                  \
  template <int R, int C>                                                                                  \
  __attribute__((target(TARGET))) static void NAME(const Weights& W, const Act& a, int64_t m0, int64_t n0, \
                                                   int64_t n1, float* y) {                                 \
    constexpr int64_t rec = 128, step = kMaxRows * rec;                                                    \
    const int64_t nb = W.nb, N = W.N, full = nb / 2, tail = nb % 2;                                        \
    const uint8_t* tile = a.pack + (m0 / kMaxRows) * a.groups * step;                                      \
    const __m256i low4 = _mm256_set1_epi8(0x0F), ones16 = _mm256_set1_epi16(1);                            \
    const __m256i idx = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);                                         \
    (void)ones16;                                                                                          \
    for (int64_t n = n0; n < n1; n += C) {                                                                 \
      const int64_t cols = std::min<int64_t>(C, n1 - n);                                                   \
      __m256 acc[R][C];                                                                                    \
      for (int r = 0; r < R; ++r)                                                                          \
        for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();                                       \
      const uint8_t* p = tile;                                                                             \
      for (int64_t g = 0; g < full + tail; ++g, p += step) {                                               \
        __m256i lo[C], hi[C];                                                                              \
        __m256 s[C];                                                                                       \
        for (int c = 0; c < C; ++c) {                                                                      \
          const int64_t col = n + std::min<int64_t>(c, cols - 1); /* past the end: a repeat, not stored */ \
          const uint8_t* cr = W.codes + col * nb * 16 + g * 32;                                            \
          const float* sw = W.scales + col * nb + g * 2;                                                   \
          __m256i code;                                                                                    \
          __m128 sv;                                                                                       \
          if (g < full) {                                                                                  \
            code = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cr));                               \
            sv = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sw)));                          \
          } else {                                                                                         \
            code = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cr)));          \
            sv = _mm_load_ss(sw);                                                                          \
          }                                                                                                \
          s[c] = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(sv), idx);                                \
          lo[c] = _mm256_and_si256(code, low4);                                                            \
          hi[c] = _mm256_and_si256(_mm256_srli_epi16(code, 4), low4);                                      \
        }                                                                                                  \
        for (int r = 0; r < R; ++r) {                                                                      \
          const uint8_t* q = p + r * rec;                                                                  \
          const __m256i bias = _mm256_load_si256(reinterpret_cast<const __m256i*>(q + 64));                \
          const __m256 xs = _mm256_load_ps(reinterpret_cast<const float*>(q + 96));                        \
          const __m256i xe = _mm256_load_si256(reinterpret_cast<const __m256i*>(q));                       \
          const __m256i xo = _mm256_load_si256(reinterpret_cast<const __m256i*>(q + 32));                  \
          for (int c = 0; c < C; ++c) {                                                                    \
            const __m256i d = DOT;                                                                         \
            acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(s[c], xs), acc[r][c]);        \
          }                                                                                                \
        }                                                                                                  \
      }                                                                                                    \
      for (int r = 0; r < R; ++r)                                                                          \
        for (int c = 0; c < cols; ++c) {                                                                   \
          const __m256 v = acc[r][c];                                                                      \
          __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));                   \
          t = _mm_add_ps(t, _mm_movehl_ps(t, t));                                                          \
          t = _mm_add_ss(t, _mm_movehdup_ps(t));                                                           \
          y[(m0 + r) * N + n + c] = _mm_cvtss_f32(t);                                                      \
        }                                                                                                  \
    }                                                                                                      \
  }

RAGTOP_TILE256(tile_avx2, "avx2,fma",
               _mm256_add_epi32(bias, _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo[c], xe),
                                                                         _mm256_maddubs_epi16(hi[c], xo)),
                                                        ones16)))
RAGTOP_TILE256(tile_avxvnni, "avx2,fma,avxvnni",
               _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(bias, lo[c], xe), hi[c], xo))

template <bool VNNI>
static void rows_256(const Weights& W, const Act& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* y) {
  for (int64_t m = m0; m < m1; m += kMaxRows) {
    const int64_t R = std::min(kMaxRows, m1 - m);
#define RAGTOP_ROWS256(RR, CC) \
  case RR: VNNI ? tile_avxvnni<RR, CC>(W, a, m, n0, n1, y) : tile_avx2<RR, CC>(W, a, m, n0, n1, y); break;
    switch (R) {
      RAGTOP_ROWS256(1, 4)
      RAGTOP_ROWS256(2, 2)
      RAGTOP_ROWS256(3, 2)
      RAGTOP_ROWS256(4, 2)
      RAGTOP_ROWS256(5, 1)
      RAGTOP_ROWS256(6, 1)
      RAGTOP_ROWS256(7, 1)
      default: VNNI ? tile_avxvnni<8, 1>(W, a, m, n0, n1, y) : tile_avx2<8, 1>(W, a, m, n0, n1, y); break;
    }
#undef RAGTOP_ROWS256
  }
}

static bool cpu_has_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}
static bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
static bool cpu_has_avxvnni() {
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avxvnni");
}
#else
template <bool VNNI>
static void rows_256(const Weights&, const Act&, int64_t, int64_t, int64_t, int64_t, float*) {}
static bool cpu_has_avx2() { return false; }
static bool cpu_has_avxvnni() { return false; }
template <int BITS>
static void rows_vnni(const Weights&, const Act&, int64_t, int64_t, int64_t, int64_t, float*) {}
static void mins_avx512(const Weights&, const Act&, int64_t, int64_t, int64_t, float*) {}
static void prepare_vnni(const float*, int64_t, const Weights&, Act&) {}
static bool cpu_has_vnni() { return false; }
#endif

// The level-4 inner loop: the best the CPU has, or RAGTOP_MATMUL_ISA = generic | avx2 |
// avxvnni | avx512vnni when the CPU has it (tests run every path the machine can).
enum class Isa { Generic, Avx2, AvxVnni, Avx512Vnni };
static Isa isa() {
  static const Isa v = [] {
    const char* e = std::getenv("RAGTOP_MATMUL_ISA");
    const std::string want = e ? e : "";
    if (want == "generic") return Isa::Generic;
    if (want == "avx2" && cpu_has_avx2()) return Isa::Avx2;
    if (want == "avxvnni" && cpu_has_avxvnni()) return Isa::AvxVnni;
    if (cpu_has_vnni()) return Isa::Avx512Vnni;
    if (cpu_has_avxvnni()) return Isa::AvxVnni;
    return cpu_has_avx2() ? Isa::Avx2 : Isa::Generic;
  }();
  return v;
}

static Act& scratch_act() {
  thread_local Act a;
  return a;
}

}  // namespace mmb

struct MatMulBlocksKernel {
  int64_t K, N, bits, block_size, level;

  MatMulBlocksKernel(const OrtApi* api, const OrtKernelInfo* info) {
    K = attr_int(api, info, "K", 0, false);
    N = attr_int(api, info, "N", 0, false);
    bits = attr_int(api, info, "bits", 4, false);
    block_size = attr_int(api, info, "block_size", 32, false);
    level = attr_int(api, info, "accuracy_level", 0, false);
    if (K < 1 || N < 1) ORT_CXX_API_THROW("ragtop::MatMulBlocks: K and N must be >= 1", ORT_INVALID_ARGUMENT);
    if (bits != 4 && bits != 8) ORT_CXX_API_THROW("ragtop::MatMulBlocks: bits must be 4 or 8", ORT_INVALID_ARGUMENT);
    if (block_size != mmb::kBlock)
      ORT_CXX_API_THROW("ragtop::MatMulBlocks: block_size must be 32", ORT_INVALID_ARGUMENT);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Ort::Status st = run(context);
      return st.release();
    } catch (const std::exception& e) {
      return Ort::Status(e).release();
    }
  }

  Ort::Status run(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const size_t n_in = ctx.GetInputCount();
    auto input = [&](size_t i) -> Ort::ConstValue { return i < n_in ? ctx.GetInput(i) : Ort::ConstValue{nullptr}; };
    Ort::ConstValue xv = input(0), bv = input(1), sv = input(2), zv = input(3), mv = input(4);
    RAGTOP_CHECK(xv && bv && sv, "MatMulBlocks: inputs A, B and scales are required");
    const std::vector<int64_t> xs = xv.GetTensorTypeAndShapeInfo().GetShape();
    RAGTOP_CHECK(!xs.empty() && xs.back() == K, "MatMulBlocks: A " + shape_str(xs) + " must end in K = " + std::to_string(K));
    const int64_t nb = (K + mmb::kBlock - 1) / mmb::kBlock;
    mmb::Weights W{bv.GetTensorData<uint8_t>(), sv.GetTensorData<float>(), nullptr, nullptr, N, K, nb, bits};
    RAGTOP_CHECK(static_cast<int64_t>(bv.GetTensorTypeAndShapeInfo().GetElementCount()) == N * nb * W.bytes_per_block(),
                 "MatMulBlocks: B must hold N * ceil(K / 32) * " + std::to_string(W.bytes_per_block()) + " bytes");
    RAGTOP_CHECK(static_cast<int64_t>(sv.GetTensorTypeAndShapeInfo().GetElementCount()) == N * nb,
                 "MatMulBlocks: scales must hold N * ceil(K / 32) values");
    if (zv) {
      const int64_t want = bits == 8 ? N * nb : N * ((nb + 1) / 2);
      RAGTOP_CHECK(static_cast<int64_t>(zv.GetTensorTypeAndShapeInfo().GetElementCount()) == want,
                   "MatMulBlocks: zero_points must hold " + std::to_string(want) + " bytes");
      W.zp = zv.GetTensorData<uint8_t>();
    }
    if (mv) {
      RAGTOP_CHECK(static_cast<int64_t>(mv.GetTensorTypeAndShapeInfo().GetElementCount()) == N * nb,
                   "MatMulBlocks: mins must be [ceil(K / 32), N]");
      W.mins = mv.GetTensorData<float>();
    }
    std::vector<int64_t> ys(xs);
    ys.back() = N;
    Ort::UnownedValue yv = ctx.GetOutput(0, ys);
    float* y = yv.GetTensorMutableData<float>();
    int64_t M = 1;
    for (size_t i = 0; i + 1 < xs.size(); ++i) M *= xs[i];
    if (M == 0) return Ort::Status(nullptr);
    const float* x = xv.GetTensorData<float>();
    const mmb::Isa isa = mmb::isa();
    const bool level4 = level == 4, vnni = level4 && isa == mmb::Isa::Avx512Vnni;
    const bool r256 = level4 && bits == 4 && (isa == mmb::Isa::Avx2 || isa == mmb::Isa::AvxVnni);
    mmb::Act& a = mmb::scratch_act();
    mmb::prepare(x, M, W, level4, vnni, a, r256);
    // columns in chunks of a multiple of 16 (whole vector lanes for the minima) holding
    // ~8 KB of codes: a chunk's codes stay in L1 while every tile of rows passes over them
    const int64_t row_bytes = nb * W.bytes_per_block();
    const int64_t chunk = std::max<int64_t>(16, (8192 / row_bytes) / 16 * 16);
    const int64_t tasks = (N + chunk - 1) / chunk;
    parallel_for(context, static_cast<size_t>(tasks), [&](size_t t) {
      const int64_t n0 = static_cast<int64_t>(t) * chunk, n1 = std::min(N, n0 + chunk);
      if (!level4)
        mmb::tile_fp32(W, x, M, n0, n1, y);
      else if (vnni && bits == 4)
        mmb::rows_vnni<4>(W, a, 0, M, n0, n1, y);
      else if (vnni)
        mmb::rows_vnni<8>(W, a, 0, M, n0, n1, y);
      else if (r256 && isa == mmb::Isa::AvxVnni)
        mmb::rows_256<true>(W, a, 0, M, n0, n1, y);
      else if (r256)
        mmb::rows_256<false>(W, a, 0, M, n0, n1, y);
      else
        mmb::tile_int8_generic(W, a, 0, M, n0, n1, y);
      mmb::finish(W, a, level4, vnni, 0, M, n0, n1, y);
    });
    return Ort::Status(nullptr);
  }
};

struct MatMulBlocksOp : Ort::CustomOpBase<MatMulBlocksOp, MatMulBlocksKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new MatMulBlocksKernel(&api, info);
      return nullptr;
    } catch (const std::exception& e) {
      return Ort::Status(e).release();
    }
  }
  const char* GetName() const { return "MatMulBlocks"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 5; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return (i == 1 || i == 3) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace ragtop

// ---------------------------------------------------------------------------------------
// Entry point: SessionOptions.register_custom_ops_library(path) calls this.
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {  // older runtime: report through the oldest API every runtime has
    const OrtApi* v1 = api_base->GetApi(1);
    const std::string msg = std::string("ragtop plugin needs onnxruntime C API version >= ") + std::to_string(ORT_API_VERSION) +
                            " (onnxruntime >= 1." + std::to_string(ORT_API_VERSION) + "); this onnxruntime is " +
                            api_base->GetVersionString();
    return v1 ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  static std::mutex mu;
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> attn, attn16, embed;
  static std::unique_ptr<Ort::CustomOpDomain> domain;
  static std::unique_ptr<ragtop::MatMulBlocksOp> matmul;
  try {
    std::lock_guard<std::mutex> lock(mu);
    if (!domain) {  // one domain object, alive as long as the library, shared by sessions
      attn.reset(
          Ort::Custom::CreateLiteCustomOp<ragtop::TopKAttentionKernel<float>>("TopKAttention", "CPUExecutionProvider", 1));
      attn16.reset(Ort::Custom::CreateLiteCustomOp<ragtop::TopKAttentionKernel<Ort::Float16_t>>(
          "TopKAttention", "CPUExecutionProvider", 1));
      embed.reset(Ort::Custom::CreateLiteCustomOp<ragtop::RaggedEmbeddingKernel>("RaggedEmbedding", "CPUExecutionProvider", 1));
      domain = std::make_unique<Ort::CustomOpDomain>("ragtop");
      domain->Add(attn.get());
      domain->Add(attn16.get());  // same name, float16 cache: onnxruntime picks by input types
      domain->Add(embed.get());
      matmul = std::make_unique<ragtop::MatMulBlocksOp>();
      domain->Add(matmul.get());
    }
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, (std::string("ragtop plugin: ") + e.what()).c_str());
  }
  return nullptr;
}
