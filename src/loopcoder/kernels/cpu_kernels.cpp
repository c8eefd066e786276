// CPU kernels. For the few-token (decode) path: skinny bf16/int8/fp32 weight GEMM with the
// SwiGLU and residual add fused in, int8 quantization, RMSNorm, RoPE, and paged decode
// attention with the later loops' gate fused in. For prompts: SwiGLU, and (AVX-512 builds) the
// causal and window attention.
//
// Decode is bound by how fast the weights stream from memory and, on a small CPU, by the number
// of small ops per layer. The linear kernel reads each weight row once for all (at most a few
// dozen) activation rows and accumulates in registers. Work is handed out to threads in tiles
// of rows (see TilePool), so a thread slowed down by another process holds the others back as
// little as possible.
//
// Where the plain PyTorch path rounds an intermediate to the activation dtype (bf16), these
// kernels round it too, so the two paths agree to within the last rounding of each op.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <thread>
#include <vector>

namespace {

using BF16 = at::BFloat16;

// Built with AVX512-BF16 and AVX512-VNNI (kernels/__init__.py picks the flags for the CPU), the
// linear kernel multiplies bf16 pairs (vdpbf16ps) and int16 pairs (vpdpwssd) 32 at a time; the
// AVX2 inner loops below serve every other x86-64 CPU.
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__) && defined(__AVX512DQ__)
#define LOOPCODER_WIDE 1
constexpr bool kWide = true;
#else
constexpr bool kWide = false;
#endif

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const BF16* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum(__m128i s) {
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// e^x for x in [-87, 0] (softmax scores less their maximum, SiLU's e^-|v|; below, a tiny positive
// value), to about 2 ulp: Cephes' expf, 2^n times a degree-6 polynomial in x - n ln 2 (ln 2 split in
// two parts). The constants serve exp8 here and exp16 (AVX-512 builds) alike.
constexpr float kExpLowest = -87.3f, kLog2e = 1.44269504088896341f, kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpLowest));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Low), _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), x));
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// silu(v) = v * sigmoid(v) with e = e^-|v| kept in exp8's range: sigmoid(v) = 1 / (1 + e) for v >= 0,
// e / (1 + e) below.
inline __m256 silu8(__m256 v) {
  __m256 e = exp8(_mm256_or_ps(v, _mm256_set1_ps(-0.0f)));
  __m256 one = _mm256_set1_ps(1.0f);
  __m256 top = _mm256_blendv_ps(e, one, _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ));
  return _mm256_div_ps(_mm256_mul_ps(v, top), _mm256_add_ps(one, e));
}

// v rounded to T, as PyTorch rounds each op's result to the tensor dtype.
template <typename T>
inline float rnd(float v) { return static_cast<float>(static_cast<T>(v)); }

// Helper threads that share out the tiles of one call at a time. Unlike an OpenMP parallel region,
// whose end waits for every thread of the team, the calling thread never waits for a helper that
// has not started: it claims every tile nobody else has, then waits only for tiles a helper has
// claimed and not finished. On a machine shared with other processes, where a helper may sit
// descheduled for a whole time slice, a call then costs at most what it costs on one thread.
class TilePool {
 public:
  static TilePool& get() {
    static TilePool* pool = new TilePool();  // never destroyed: its helpers live as long as the process
    return *pool;
  }

  void run(int64_t n, int64_t helpers, const std::function<void(int64_t)>& body) {
    grow(helpers);
    auto job = std::make_shared<Job>(body, n, helpers);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work(*job);
    while (job->done.load(std::memory_order_acquire) < n) _mm_pause();
  }

 private:
  struct Job {
    Job(const std::function<void(int64_t)>& body, int64_t n, int64_t helpers) : body(body), n(n), helpers(helpers) {}
    const std::function<void(int64_t)>& body;  // only called for a claimed tile, i.e. before `run` returns
    int64_t n, helpers;
    std::atomic<int64_t> next{0}, done{0};
  };

  static void work(Job& job) {
    for (int64_t t; (t = job.next.fetch_add(1, std::memory_order_relaxed)) < job.n;) {
      job.body(t);
      job.done.fetch_add(1, std::memory_order_release);
    }
  }

  void grow(int64_t helpers) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (static_cast<int64_t>(count_) < helpers) std::thread(&TilePool::loop, this, count_++).detach();
  }

  void loop(size_t index) {
    uint64_t seen = 0;
    for (;;) {
      auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(100);
      while (generation_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < spin_until)
        std::this_thread::yield();  // lets the caller's thread run first if it shares this core
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
      }
      if (static_cast<int64_t>(index) < job->helpers) work(*job);
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Job> job_;
  size_t count_ = 0;
};

thread_local bool in_tile = false;

// Run body(tile) for tiles 0..n-1 on PyTorch's number of threads (one, if `serial`).
template <typename F>
void for_each_tile(int64_t n, const F& body, bool serial = false) {
  int64_t helpers = std::min<int64_t>(at::get_num_threads(), n) - 1;
  if (serial || helpers <= 0 || in_tile) {
    for (int64_t t = 0; t < n; ++t) body(t);
    return;
  }
  std::function<void(int64_t)> wrapped = [&](int64_t t) {
    in_tile = true;
    body(t);
    in_tile = false;
  };
  TilePool::get().run(n, helpers, wrapped);
}

// ---- linear: y[M, N] = residual + x[M, K] . w[N, K]^T (* scale[N]) ------------------------------
//
// Each weight format has its own AVX2 inner loop, shaped for cores (like AMD Zen 1) where a 256-bit
// op is two uops and only two pipes multiply (AVX-512 builds replace the bf16 and int8 ones: see
// "the linear kernel's AVX-512 path" below):
// - bf16: 16 weights per step, loaded as 8 32-bit lanes of (even, odd) pairs. The odd weight is
//   the lane with its low half masked off, the even one the lane shifted left by 16: widening
//   costs two cheap ops per 16 weights (the activations are stored split into even and odd
//   halves to match), where zero-extend-and-shift costs four.
// - int8: 16 weights per step, sign-extended to int16 and multiplied with the activations in
//   15-bit fixed point (one scale per 256 of them) by pmaddwd into int32 sums: one widening op
//   per 8 weights, against three per 8 for the fp32 route (extend, convert, FMA). The fixed
//   point rounds an activation more finely than bf16 does unless a value 2^6 times larger sits
//   in the same 256.
// - fp32: 8 weights per step, plain FMAs.
//
// bf16 and int8 weights may be packed (see `pack`): each group of 8 rows stored as one stream of
// 16-weight chunks, row after row, so the 8 rows a tile reads come from one contiguous run of
// memory instead of 8 runs a row apart; the hardware prefetcher keeps up far better.

constexpr int64_t kStep = 16;    // weights per inner step
constexpr int64_t kGroup = 8;    // rows per packed group
constexpr int64_t kBlock = 256;  // activations per fixed-point scale (int8 weights)

inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// Software prefetch ahead in a packed stream (bytes, measured best on Zen 1: about 1.2x over the
// hardware prefetcher alone); row-major weights are left to the hardware (R streams a row apart).
template <typename W>
constexpr int64_t kPrefetchBytes = 1024;
template <>
constexpr int64_t kPrefetchBytes<int8_t> = 2048;

template <typename W>
inline void prefetch(const W* chunk, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(chunk) + kPrefetchBytes<W>;
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

// With several activation rows a packed group is read once per pass over a few of them, from
// memory only in the first pass: prefetching a short way ahead would leave the memory idle in the
// later passes, which compute from cache, and make the first pass wait on it. Instead, while one
// group is computed, the next group is fetched into L2 evenly over all of its passes' steps, so
// the weights stream while the core multiplies (measured on Zen 1, bf16: 1.06x at 8 rows, 1.17x at 2).
struct NextGroup {
  const char* next;
  const char* end;
  int64_t lines_per_step;

  // The group of `bytes` after the one at `group`, fetched evenly over `steps` inner steps.
  static NextGroup after(const void* group, int64_t bytes, int64_t steps) {
    const char* start = static_cast<const char*>(group) + bytes;
    return NextGroup{start, start + bytes, std::max<int64_t>(1, (bytes / 64 + steps - 1) / std::max<int64_t>(steps, 1))};
  }

  inline void step() {
    for (int64_t i = 0; i < lines_per_step && next < end; ++i, next += 64) _mm_prefetch(next, _MM_HINT_T1);
  }
};

// Where the 16-weight chunk at column k of row r of a tile starts: base + k * k_mul + r * r_stride.
template <typename W>
struct Rows {
  const W* base;
  int64_t k_mul, r_stride;
  inline const W* at(int r, int64_t k) const { return base + k * k_mul + r * r_stride; }
};

// Eight fp32 lanes rounded to T (bf16: to nearest even, NaN kept), still as fp32; and stored as T.
template <typename T>
inline __m256 round8(__m256 v) {
  if constexpr (std::is_same<T, float>::value) return v;
  __m256i bits = _mm256_castps_si256(v);
  __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_and_si256(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
  return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(BF16* p, __m256 v) {  // v already rounded to bf16: its high halves
  __m256i high = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1)));
}

#ifdef LOOPCODER_WIDE
// The same on 16 lanes: exp16 and silu16 give exp8's and silu8's results lane for lane.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const BF16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

template <typename T>
inline __m512 round16(__m512 v) {
  if constexpr (std::is_same<T, float>::value) return v;
  __m256i bits = (__m256i)_mm512_cvtneps_pbh(v);  // to nearest even
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(BF16* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v)); }

inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpLowest));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x));
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  return _mm512_scalef_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f))), n);
}

// The bf16 pair at p in all 16 lanes (a multiplier of vdpbf16ps).
inline __m512bh pair_of(const BF16* p) {
  int32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return (__m512bh)_mm512_set1_epi32(bits);
}

inline __m512 silu16(__m512 v) {
  __m512 e = exp16(_mm512_or_ps(v, _mm512_set1_ps(-0.0f)));
  __m512 one = _mm512_set1_ps(1.0f);
  __m512 top = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GE_OQ), one);
  return _mm512_div_ps(_mm512_mul_ps(v, top), _mm512_add_ps(one, e));
}
#endif

// dst[k] = silu(gate[k]) * up[k] for k < K, 16 (AVX-512) or 8 at a time; the SiLU and the product are
// each rounded to T, as PyTorch's two ops round them.
template <typename T, typename Out>
inline void swiglu_row(const T* gate, const T* up, int64_t K, Out* dst) {
  int64_t k = 0;
#ifdef LOOPCODER_WIDE
  for (; k + 16 <= K; k += 16) store16(dst + k, round16<T>(_mm512_mul_ps(round16<T>(silu16(load16(gate + k))), load16(up + k))));
#endif
  for (; k + 8 <= K; k += 8) store8(dst + k, round8<T>(_mm256_mul_ps(round8<T>(silu8(load8(gate + k))), load8(up + k))));
  if (k == K) return;
  float lanes[8] = {}, ups[8] = {};  // the tail through padded copies
  for (int64_t i = 0; i < K - k; ++i) lanes[i] = static_cast<float>(gate[k + i]), ups[i] = static_cast<float>(up[k + i]);
  _mm256_storeu_ps(lanes, round8<T>(_mm256_mul_ps(round8<T>(silu8(_mm256_loadu_ps(lanes))), _mm256_loadu_ps(ups))));
  for (int64_t i = 0; i < K - k; ++i) dst[k + i] = static_cast<Out>(lanes[i]);
}

// One call's activations, in the layouts the inner loops read.
struct Activations {
  int64_t M, K, width, body, blocks;  // width: K rounded up to kStep; body: the columns the vector loops cover
  std::vector<float> natural;         // [M, K]
  std::vector<float> split;           // [M, width]: per 16, the 8 even then the 8 odd values, zero-padded (bf16, AVX2)
  std::vector<BF16> pairs;            // [M, width]: the bf16 values in order, zero-padded (bf16 on AVX512-BF16)
  std::vector<int16_t> fixed;         // [M, width]: value / fixed_scale, rounded, zero-padded (int8)
  std::vector<float> fixed_scale;     // [M, blocks]
};

template <typename T>
Activations prepare(const T* x, int64_t M, int64_t K, bool swiglu, c10::ScalarType weight_type, bool packed) {
  int64_t width = round_up(K, kStep), body = packed ? width : K / kStep * kStep;
  Activations a{M, K, width, body, (body + kBlock - 1) / kBlock, std::vector<float>(M * K), {}, {}, {}, {}};
  int64_t ld = swiglu ? 2 * K : K;
  for (int64_t m = 0; m < M; ++m) {
    const T* row = x + m * ld;
    float* dst = a.natural.data() + m * K;
    if (swiglu) swiglu_row(row, row + K, K, dst);
    else for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<float>(row[k]);
  }
  auto value = [&](int64_t m, int64_t k) { return k < K ? a.natural[m * K + k] : 0.0f; };
  if (kWide && weight_type == torch::kBFloat16 && std::is_same<T, BF16>::value) {  // bf16 values: exact as bf16 pairs
    a.pairs.resize(M * width);
    for (int64_t m = 0; m < M; ++m) {
      const float* src = a.natural.data() + m * K;
      BF16* dst = a.pairs.data() + m * width;
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) store8(dst + k, _mm256_loadu_ps(src + k));
      for (; k < K; ++k) dst[k] = static_cast<BF16>(src[k]);
    }
  } else if (weight_type == torch::kBFloat16) {
    a.split.resize(M * width);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < width; k += kStep)
        for (int64_t i = 0; i < kStep / 2; ++i) {
          a.split[m * width + k + i] = value(m, k + 2 * i);
          a.split[m * width + k + kStep / 2 + i] = value(m, k + 2 * i + 1);
        }
  } else if (weight_type == torch::kChar) {
    a.fixed.resize(M * width);
    a.fixed_scale.resize(M * a.blocks);
    std::vector<float> row(width, 0.0f);  // one row, zero-padded; blocks span multiples of 16 columns
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t m = 0; m < M; ++m) {
      std::copy(a.natural.data() + m * K, a.natural.data() + (m + 1) * K, row.begin());
      for (int64_t b = 0; b < a.blocks; ++b) {
        int64_t first = b * kBlock, end = std::min(body, first + kBlock);
        __m256 top8 = _mm256_setzero_ps();
        for (int64_t k = first; k < end; k += 8) top8 = _mm256_max_ps(top8, _mm256_andnot_ps(sign, _mm256_loadu_ps(&row[k])));
        float top = hmax(top8);
        float s = top > 0.0f ? top / 32767.0f : 1.0f;
        a.fixed_scale[m * a.blocks + b] = s;
        __m256 sv = _mm256_set1_ps(s);
        for (int64_t k = first; k < end; k += 8) {  // value / s rounded to nearest even, as std::nearbyint
          __m256i q = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(&row[k]), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(a.fixed.data() + m * width + k),
                           _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
        }
      }
    }
  }
  return a;
}

// Dot products of R weight rows with activation rows m0..m0+MT-1 over the body of K.
template <int R, int MT>
inline void dot(const Rows<BF16>& w, const Activations& a, int64_t m0, float (&out)[R][MT], NextGroup* ahead) {
  const __m256 odd_mask = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const float* x = a.split.data() + m0 * a.width;
  __m256 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < a.body; k += kStep) {
    __m256 even_x[MT], odd_x[MT];
    for (int m = 0; m < MT; ++m) {
      even_x[m] = _mm256_loadu_ps(x + m * a.width + k);
      odd_x[m] = _mm256_loadu_ps(x + m * a.width + k + kStep / 2);
    }
    if (ahead) ahead->step();
    else if (w.k_mul == kGroup) prefetch(w.at(0, k), R * kStep * 2);
    for (int r = 0; r < R; ++r) {
      __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.at(r, k)));
      __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
      __m256 odd = _mm256_and_ps(_mm256_castsi256_ps(pairs), odd_mask);
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_fmadd_ps(odd, odd_x[m], _mm256_fmadd_ps(even, even_x[m], acc[r][m]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) out[r][m] = hsum(acc[r][m]);
}

template <int R, int MT>
inline void dot(const Rows<int8_t>& w, const Activations& a, int64_t m0, float (&out)[R][MT], NextGroup*) {
  // 128-bit ops: on Zen 1 they schedule better here than 256-bit ones (about 1.2x in cache).
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) out[r][m] = 0.0f;
  for (int64_t b = 0; b < a.blocks; ++b) {
    __m128i acc[R][MT];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm_setzero_si128();
    for (int64_t k = b * kBlock; k < std::min(a.body, (b + 1) * kBlock); k += kStep) {
      __m128i lo_x[MT], hi_x[MT];
      for (int m = 0; m < MT; ++m) {
        const int16_t* x = a.fixed.data() + (m0 + m) * a.width + k;
        lo_x[m] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
        hi_x[m] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8));
      }
      if (w.k_mul == kGroup) prefetch(w.at(0, k), R * kStep);
      for (int r = 0; r < R; ++r) {
        // Two 8-byte loads sign-extended straight from memory: no shuffle to reach the upper half.
        const int8_t* raw = w.at(r, k);
        __m128i lo = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(raw)));
        __m128i hi = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(raw + 8)));
        for (int m = 0; m < MT; ++m)
          acc[r][m] = _mm_add_epi32(acc[r][m], _mm_add_epi32(_mm_madd_epi16(lo, lo_x[m]), _mm_madd_epi16(hi, hi_x[m])));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) out[r][m] += static_cast<float>(hsum(acc[r][m])) * a.fixed_scale[(m0 + m) * a.blocks + b];
  }
}

template <int R, int MT>
inline void dot(const Rows<float>& w, const Activations& a, int64_t m0, float (&out)[R][MT], NextGroup*) {
  const float* x = a.natural.data() + m0 * a.K;
  __m256 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < a.body; k += 8) {
    __m256 xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = _mm256_loadu_ps(x + m * a.K + k);
    for (int r = 0; r < R; ++r) {
      __m256 wv = _mm256_loadu_ps(w.at(r, k));
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) out[r][m] = hsum(acc[r][m]);
}

template <typename T>
struct Epilogue {
  T* y;
  const T* residual;
  const float* scale;
  int64_t ld;

  inline void store(int64_t m, int64_t n, float v) const {
    if (scale) v *= scale[n];
    if (residual) v = static_cast<float>(residual[m * ld + n]) + rnd<T>(v);
    y[m * ld + n] = static_cast<T>(v);
  }
};

// Outputs [m0, m0 + MT) x [n0, n0 + R): the body's dot products, the scalar K tail of unpacked
// rows (row-major, r_stride apart), the epilogue.
template <int R, int MT, typename W, typename T>
inline void finish(const Rows<W>& w, const Activations& a, int64_t m0, int64_t n0, const Epilogue<T>& out, float (&s)[R][MT]) {
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      for (int64_t k = a.body; k < a.K; ++k) s[r][m] += static_cast<float>(w.base[r * w.r_stride + k]) * a.natural[(m0 + m) * a.K + k];
      out.store(m0 + m, n0 + r, s[r][m]);
    }
}

template <int R, int MT, typename W, typename T>
inline void tile(const Rows<W>& w, const Activations& a, int64_t m0, int64_t n0, const Epilogue<T>& out, NextGroup* ahead = nullptr) {
  float s[R][MT];
  dot<R, MT>(w, a, m0, s, ahead);
  finish<R, MT>(w, a, m0, n0, out, s);
}

#ifdef LOOPCODER_WIDE
// ---- the linear kernel's AVX-512 path ----------------------------------------------------------
//
// One 512-bit register holds the 16-weight chunks of two rows (r, r + 1) at one column: a packed
// group stores them next to each other, so it is one load (two for row-major weights: row_pair). Each
// activation chunk is broadcast to both halves, and vdpbf16ps (bf16) or vpdpwssd (int8 widened to
// int16, activations in 15-bit fixed point as on AVX2) adds 32 products into 16 fp32/int32 sums:
// lanes 0-7 belong to row r, 8-15 to row r + 1. bf16 activations are exact as bf16 and each
// product of two bf16 values is exact in fp32, so only the order of the fp32 sums differs from
// the AVX2 path. Up to 4 activation rows share each weight load (16 sums in registers).
constexpr int kWideRows = 4;

// Rows r and r + 1 of row-major weights at column k (row r alone, zero-extended, when it is the last).
inline __m512i row_pair(const Rows<BF16>& w, int r, int R, int64_t k) {
  const BF16* p = w.at(r, k);
  __m512i lo = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  if (r + 1 == R) return _mm512_zextsi256_si512(_mm512_castsi512_si256(lo));
  return _mm512_inserti64x4(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.at(r + 1, k))), 1);
}

inline __m512i row_pair(const Rows<int8_t>& w, int r, int R, int64_t k) {
  const int8_t* p = w.at(r, k);
  __m256i raw;
  if (r + 1 == R) raw = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  else raw = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(w.at(r + 1, k)), reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi8_epi16(raw);
}

inline __m512i broadcast_chunk(const void* p) { return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// The row r (low half) and row r + 1 (high half) totals of a pair's sums.
template <int R, int MT>
inline void pair_totals(const __m512& sums, int p, int m, float (&out)[R][MT]) {
  out[2 * p][m] = hsum(_mm512_castps512_ps256(sums));
  if (2 * p + 1 < R) out[2 * p + 1][m] = hsum(_mm512_extractf32x8_ps(sums, 1));
}

template <int R, int MT>
inline void dot_wide(const Rows<BF16>& w, const Activations& a, int64_t m0, float (&out)[R][MT], NextGroup* ahead) {
  constexpr int P = (R + 1) / 2;
  const bool packed = R == kGroup && w.k_mul == kGroup;  // packed tiles are whole groups
  const BF16* x = a.pairs.data() + m0 * a.width;
  __m512 acc[P][MT];
  for (int p = 0; p < P; ++p)
    for (int m = 0; m < MT; ++m) acc[p][m] = _mm512_setzero_ps();
  if (packed) {  // one run of memory, 8 rows x 16 weights per step
    const BF16* wp = w.base;
    for (int64_t k = 0; k < a.body; k += kStep, wp += kGroup * kStep) {
      __m512bh xv[MT];
      for (int m = 0; m < MT; ++m) xv[m] = (__m512bh)broadcast_chunk(x + m * a.width + k);
      if (ahead) ahead->step();
      for (int p = 0; p < P; ++p) {
        __m512bh wv = (__m512bh)_mm512_loadu_si512(wp + 2 * p * kStep);
        for (int m = 0; m < MT; ++m) acc[p][m] = _mm512_dpbf16_ps(acc[p][m], wv, xv[m]);
      }
    }
  } else {
    for (int64_t k = 0; k < a.body; k += kStep) {
      __m512bh xv[MT];
      for (int m = 0; m < MT; ++m) xv[m] = (__m512bh)broadcast_chunk(x + m * a.width + k);
      for (int p = 0; p < P; ++p) {
        __m512bh wv = (__m512bh)row_pair(w, 2 * p, R, k);
        for (int m = 0; m < MT; ++m) acc[p][m] = _mm512_dpbf16_ps(acc[p][m], wv, xv[m]);
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int m = 0; m < MT; ++m) pair_totals<R, MT>(acc[p][m], p, m, out);
}

template <int R, int MT>
inline void dot_wide(const Rows<int8_t>& w, const Activations& a, int64_t m0, float (&out)[R][MT], NextGroup* ahead) {
  constexpr int P = (R + 1) / 2;
  const bool packed = R == kGroup && w.k_mul == kGroup;  // packed tiles are whole groups
  __m512 total[P][MT];
  for (int p = 0; p < P; ++p)
    for (int m = 0; m < MT; ++m) total[p][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < a.blocks; ++b) {
    __m512i acc[P][MT];
    for (int p = 0; p < P; ++p)
      for (int m = 0; m < MT; ++m) acc[p][m] = _mm512_setzero_si512();
    for (int64_t k = b * kBlock; k < std::min(a.body, (b + 1) * kBlock); k += kStep) {
      __m512i xv[MT];
      for (int m = 0; m < MT; ++m) xv[m] = broadcast_chunk(a.fixed.data() + (m0 + m) * a.width + k);
      if (ahead) ahead->step();
      if (packed) {  // one run of memory, 8 rows x 16 weights per step
        const int8_t* wp = w.base + k * kGroup;
        for (int p = 0; p < P; ++p) {
          __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 2 * p * kStep)));
          for (int m = 0; m < MT; ++m) acc[p][m] = _mm512_dpwssd_epi32(acc[p][m], wv, xv[m]);
        }
      } else {
        for (int p = 0; p < P; ++p) {
          __m512i wv = row_pair(w, 2 * p, R, k);
          for (int m = 0; m < MT; ++m) acc[p][m] = _mm512_dpwssd_epi32(acc[p][m], wv, xv[m]);
        }
      }
    }
    for (int m = 0; m < MT; ++m) {
      __m512 scale = _mm512_set1_ps(a.fixed_scale[(m0 + m) * a.blocks + b]);
      for (int p = 0; p < P; ++p) total[p][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[p][m]), scale, total[p][m]);
    }
  }
  for (int p = 0; p < P; ++p)
    for (int m = 0; m < MT; ++m) pair_totals<R, MT>(total[p][m], p, m, out);
}

template <int R, int MT, typename W, typename T>
inline void tile_wide(const Rows<W>& w, const Activations& a, int64_t m0, int64_t n0, const Epilogue<T>& out, NextGroup* ahead) {
  float s[R][MT];
  dot_wide<R, MT>(w, a, m0, s, ahead);
  finish<R, MT>(w, a, m0, n0, out, s);
}

// All activation rows against R weight rows, kWideRows at a time. With several passes over a
// packed group, the next group streams into L2 meanwhile (see NextGroup).
template <int R, typename W, typename T>
inline void rows_wide(const Rows<W>& w, const Activations& a, int64_t n0, const Epilogue<T>& out) {
  NextGroup ahead{}, *next = nullptr;
  if (a.M > 1 && w.k_mul == kGroup) {
    ahead = NextGroup::after(w.base, R * a.width * static_cast<int64_t>(sizeof(W)), (a.M + kWideRows - 1) / kWideRows * (a.body / kStep));
    next = &ahead;
  }
  int64_t m = 0;
  for (; m + kWideRows <= a.M; m += kWideRows) tile_wide<R, kWideRows>(w, a, m, n0, out, next);
  switch (a.M - m) {
    case 3: tile_wide<R, 3>(w, a, m, n0, out, next); break;
    case 2: tile_wide<R, 2>(w, a, m, n0, out, next); break;
    case 1: tile_wide<R, 1>(w, a, m, n0, out, next); break;
  }
}
#endif

template <int R, typename W, typename T>
inline void rows_against_all(const Rows<W>& w, const Activations& a, int64_t n0, const Epilogue<T>& out) {
#ifdef LOOPCODER_WIDE
  if constexpr (!std::is_same<W, float>::value) {
    if (std::is_same<W, int8_t>::value || !a.pairs.empty()) return rows_wide<R>(w, a, n0, out);
  }
#endif
  if (R == kGroup && a.M == 1) return tile<R, 1>(w, a, 0, n0, out);  // eight independent sums hide the FMA latency
  constexpr int kHalf = R == kGroup ? 4 : R;  // at most 8 accumulators, so activations stay in registers
  NextGroup ahead{}, *next = nullptr;
  if (std::is_same<W, BF16>::value && w.k_mul == kGroup) {  // packed bf16 (int8 measured no better): next group during this one
    ahead = NextGroup::after(w.base, R * a.width * static_cast<int64_t>(sizeof(W)), (R / kHalf) * ((a.M + 1) / 2) * (a.body / kStep));
    next = &ahead;
  }
  for (int h = 0; h < R; h += kHalf) {
    Rows<W> half{w.base + h * w.r_stride, w.k_mul, w.r_stride};
    int64_t m = 0;
    for (; m + 2 <= a.M; m += 2) tile<kHalf, 2>(half, a, m, n0 + h, out, next);
    if (m < a.M) tile<kHalf, 1>(half, a, m, n0 + h, out, next);
  }
}

constexpr int64_t kTileBytes = 256 << 10;

template <typename W, typename T>
void linear_rows(const W* w, int64_t N, const Activations& a, bool packed, const Epilogue<T>& out) {
  int64_t ld = packed ? a.width : a.K;  // elements per row (packed rows are padded to a multiple of 16)
  int64_t grouped = packed ? N / kGroup * kGroup : N / 4 * 4;
  // Weight rows per work item: about kTileBytes of weights (a multiple of 8 rows, at least 32), so
  // each thread streams long runs of memory, yet a call still has several items per thread. The
  // items are laid out in one lane per thread and claimed across the lanes in turn: threads that
  // keep pace each walk their own contiguous part of the weights (1.04-1.13x over claiming them in
  // order, which interleaves the threads' reads); claiming stays dynamic, so a thread slowed down
  // by another process holds the others back no more than before.
  int64_t rows = std::max<int64_t>(32, kTileBytes / static_cast<int64_t>(ld * sizeof(W)) / kGroup * kGroup);
  int64_t tiles = (N + rows - 1) / rows, lanes = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  int64_t per_lane = (tiles + lanes - 1) / lanes;
  for_each_tile(lanes * per_lane, [&](int64_t claim) {
    int64_t t = claim % lanes * per_lane + claim / lanes;
    if (t >= tiles) return;
    int64_t n = t * rows, end = std::min(N, n + rows), tiled = std::min(end, grouped);
    while (n < tiled) {
      if (packed) {
        rows_against_all<kGroup>(Rows<W>{w + n * ld, kGroup, kStep}, a, n, out);
        n += kGroup;
      } else if (a.M == 1 && n + kGroup <= tiled) {
        rows_against_all<kGroup>(Rows<W>{w + n * ld, 1, ld}, a, n, out);
        n += kGroup;
      } else {
        rows_against_all<4>(Rows<W>{w + n * ld, 1, ld}, a, n, out);
        n += 4;
      }
    }
    for (; n < end; ++n) rows_against_all<1>(Rows<W>{w + n * ld, 1, ld}, a, n, out);
  });
}

template <typename T>
void linear_typed(const torch::Tensor& x, const torch::Tensor& w, int64_t K, const float* scale, const T* residual, bool swiglu,
                  bool packed, torch::Tensor& y) {
  Activations a = prepare(x.data_ptr<T>(), y.size(0), K, swiglu, w.scalar_type(), packed);
  Epilogue<T> out{y.data_ptr<T>(), residual, scale, y.size(1)};
  switch (w.scalar_type()) {
    case torch::kBFloat16: linear_rows(w.data_ptr<BF16>(), w.size(0), a, packed, out); break;
    case torch::kChar: linear_rows(w.data_ptr<int8_t>(), w.size(0), a, packed, out); break;
    case torch::kFloat: linear_rows(w.data_ptr<float>(), w.size(0), a, false, out); break;
    default: TORCH_CHECK(false, "linear: weight must be bfloat16, int8 or float32");
  }
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& scale,
                     const c10::optional<torch::Tensor>& residual, bool swiglu, bool packed) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.is_contiguous() && w.is_contiguous(), "linear: contiguous x [M, K] and w [N, K]");
  int64_t K = swiglu ? x.size(1) / 2 : x.size(1);
  TORCH_CHECK(w.size(1) == (packed ? round_up(K, kStep) : K), "linear: x and w disagree on K");
  TORCH_CHECK(!packed || w.scalar_type() != torch::kFloat, "linear: fp32 weights are never packed");
  TORCH_CHECK(!scale || (scale->scalar_type() == torch::kFloat && scale->is_contiguous()), "linear: scale must be float32");
  auto y = torch::empty({x.size(0), w.size(0)}, x.options());
  TORCH_CHECK(!residual || (residual->sizes() == y.sizes() && residual->is_contiguous() && residual->scalar_type() == x.scalar_type()),
              "linear: residual must match the output");
  const float* s = scale ? scale->data_ptr<float>() : nullptr;
  if (x.scalar_type() == torch::kBFloat16) {
    linear_typed<BF16>(x, w, K, s, residual ? residual->data_ptr<BF16>() : nullptr, swiglu, packed, y);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat, "linear: activations must be bfloat16 or float32");
    linear_typed<float>(x, w, K, s, residual ? residual->data_ptr<float>() : nullptr, swiglu, packed, y);
  }
  return y;
}

// silu(gate) * up of rows x = [gate | up]: the SwiGLU of a prompt's rows, before the GEMM of the
// down projection (decode fuses it into the linear kernel's activations instead).
torch::Tensor swiglu(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0, "swiglu: contiguous x [M, 2I]");
  int64_t M = x.size(0), I = x.size(1) / 2;
  auto y = torch::empty({M, I}, x.options());
  auto run = [&](auto* in, auto* out) {
    for_each_tile((M + 7) / 8, [&](int64_t t) {
      for (int64_t m = t * 8; m < std::min(M, (t + 1) * 8); ++m) swiglu_row(in + m * 2 * I, in + m * 2 * I + I, I, out + m * I);
    });
  };
  if (x.scalar_type() == torch::kBFloat16) run(x.data_ptr<BF16>(), y.data_ptr<BF16>());
  else if (x.scalar_type() == torch::kFloat) run(x.data_ptr<float>(), y.data_ptr<float>());
  else TORCH_CHECK(false, "swiglu: bfloat16 or float32");
  return y;
}

// ---- packing: w [N, K] <-> [N, K rounded up to 16], each full group of 8 rows as 16-wide chunks -----

// Element (n, k) of the packed layout (k < the padded width).
inline int64_t packed_index(int64_t n, int64_t k, int64_t N, int64_t width) {
  if (n >= N / kGroup * kGroup) return n * width + k;  // the last partial group stays row-major
  return (n / kGroup) * kGroup * width + (k / kStep) * kGroup * kStep + (n % kGroup) * kStep + k % kStep;
}

// Copy each row's 16-wide chunks between the plain [N, K] and packed layouts (zero padding past K),
// a group of 8 rows per work item, so one thread reads all of a group's packed chunks.
template <typename W>
void repack(const W* src, W* dst, int64_t N, int64_t K, int64_t width, bool to_packed) {
  for_each_tile((N + kGroup - 1) / kGroup, [&](int64_t g) {
    if (!to_packed && K == width && (g + 1) * kGroup <= N) {  // a full group back to rows: chunk by chunk, one 16-wide run per row
      const W* chunk = src + g * kGroup * width;
      W* rows = dst + g * kGroup * K;
      for (int64_t k = 0; k < K; k += kStep, chunk += kGroup * kStep)
        for (int64_t r = 0; r < kGroup; ++r) std::memcpy(rows + r * K + k, chunk + r * kStep, kStep * sizeof(W));
      return;
    }
    for (int64_t n = g * kGroup; n < std::min(N, (g + 1) * kGroup); ++n) {
      for (int64_t k = 0; k < width; k += kStep) {
        int64_t p = packed_index(n, k, N, width), count = std::min(kStep, K - k);
        const W* from = to_packed ? src + n * K + k : src + p;
        W* to = to_packed ? dst + p : dst + n * K + k;
        if (count == kStep) {
          std::memcpy(to, from, kStep * sizeof(W));  // a fixed size: one vector move
        } else {
          std::copy(from, from + count, to);
          if (to_packed) std::fill(to + count, to + kStep, W(0));
        }
      }
    }
  });
}

torch::Tensor pack(const torch::Tensor& w, const c10::optional<torch::Tensor>& into) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "pack: contiguous w [N, K]");
  int64_t N = w.size(0), K = w.size(1), width = round_up(K, kStep);
  TORCH_CHECK(!into || (into->sizes() == torch::IntArrayRef({N, width}) && into->is_contiguous() && into->scalar_type() == w.scalar_type()),
              "pack: `into` must be a contiguous [N, K rounded up to 16] tensor of w's dtype");
  auto out = into ? *into : torch::empty({N, width}, w.options());
  if (w.scalar_type() == torch::kBFloat16) repack(w.data_ptr<BF16>(), out.data_ptr<BF16>(), N, K, width, true);
  else if (w.scalar_type() == torch::kChar) repack(w.data_ptr<int8_t>(), out.data_ptr<int8_t>(), N, K, width, true);
  else TORCH_CHECK(false, "pack: bfloat16 or int8 weights");
  return out;
}

torch::Tensor unpack(const torch::Tensor& p, int64_t K) {
  TORCH_CHECK(p.dim() == 2 && p.is_contiguous() && p.size(1) == round_up(K, kStep), "unpack: packed [N, K rounded up to 16]");
  int64_t N = p.size(0);
  auto out = torch::empty({N, K}, p.options());
  if (p.scalar_type() == torch::kBFloat16) repack(p.data_ptr<BF16>(), out.data_ptr<BF16>(), N, K, p.size(1), false);
  else if (p.scalar_type() == torch::kChar) repack(p.data_ptr<int8_t>(), out.data_ptr<int8_t>(), N, K, p.size(1), false);
  else TORCH_CHECK(false, "unpack: bfloat16 or int8 weights");
  return out;
}

torch::Tensor packed_rows(const torch::Tensor& p, const torch::Tensor& ids, int64_t K) {
  TORCH_CHECK(p.dim() == 2 && p.is_contiguous() && p.size(1) == round_up(K, kStep), "packed_rows: packed [N, K rounded up to 16]");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == torch::kLong, "packed_rows: ids [B] int64");
  auto idx = ids.contiguous();
  int64_t B = idx.size(0), N = p.size(0), width = p.size(1);
  auto out = torch::empty({B, K}, p.options());
  const int64_t* ip = idx.data_ptr<int64_t>();
  auto gather = [&](auto* src, auto* dst) {
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(ip[b] >= 0 && ip[b] < N, "packed_rows: id out of range");
      for (int64_t k = 0; k < K; ++k) dst[b * K + k] = src[packed_index(ip[b], k, N, width)];
    }
  };
  if (p.scalar_type() == torch::kBFloat16) gather(p.data_ptr<BF16>(), out.data_ptr<BF16>());
  else if (p.scalar_type() == torch::kChar) gather(p.data_ptr<int8_t>(), out.data_ptr<int8_t>());
  else TORCH_CHECK(false, "packed_rows: bfloat16 or int8 weights");
  return out;
}

// ---- int8 quantization: w[N, K] = scale[N] * q[N, K] ---------------------------------------------

// Per row: scale = max|w| / 127 (1 for an all-zero row), q = w / scale rounded to nearest even,
// exactly as the PyTorch fallback computes it.
template <typename W>
void quantize_rows(const W* w, int8_t* q, float* scale, int64_t N, int64_t K) {
  constexpr int64_t kRows = 64;
  const __m256 sign = _mm256_set1_ps(-0.0f), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  for_each_tile((N + kRows - 1) / kRows, [&](int64_t t) {
    for (int64_t n = t * kRows; n < std::min(N, (t + 1) * kRows); ++n) {
      const W* row = w + n * K;
      int8_t* out = q + n * K;
      int64_t body = K / 8 * 8;
      __m256 top8 = _mm256_setzero_ps();
      for (int64_t k = 0; k < body; k += 8) top8 = _mm256_max_ps(top8, _mm256_andnot_ps(sign, load8(row + k)));
      float top = hmax(top8);
      for (int64_t k = body; k < K; ++k) top = std::max(top, std::fabs(static_cast<float>(row[k])));
      float s = top > 0.0f ? top / 127.0f : 1.0f;
      scale[n] = s;
      __m256 sv = _mm256_set1_ps(s);
      for (int64_t k = 0; k < body; k += 8) {
        __m256 r = _mm256_round_ps(_mm256_div_ps(load8(row + k), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256i i32 = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k), _mm_packs_epi16(i16, i16));
      }
      for (int64_t k = body; k < K; ++k) out[k] = static_cast<int8_t>(std::clamp(std::nearbyint(static_cast<float>(row[k]) / s), -127.0f, 127.0f));
    }
  });
}

std::vector<torch::Tensor> quantize_int8(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "quantize_int8: contiguous w [N, K]");
  auto q = torch::empty(w.sizes(), w.options().dtype(torch::kChar));
  auto scale = torch::empty({w.size(0)}, w.options().dtype(torch::kFloat));
  if (w.scalar_type() == torch::kBFloat16) {
    quantize_rows(w.data_ptr<BF16>(), q.data_ptr<int8_t>(), scale.data_ptr<float>(), w.size(0), w.size(1));
  } else {
    TORCH_CHECK(w.scalar_type() == torch::kFloat, "quantize_int8: bfloat16 or float32");
    quantize_rows(w.data_ptr<float>(), q.data_ptr<int8_t>(), scale.data_ptr<float>(), w.size(0), w.size(1));
  }
  return {q, scale};
}

// ---- RMSNorm and RoPE -------------------------------------------------------------------------

template <typename T>
void rms_norm_typed(const T* x, const T* w, T* y, int64_t M, int64_t K, float eps) {
  constexpr int64_t kRows = 8;
  for_each_tile((M + kRows - 1) / kRows, [&](int64_t t) {
    for (int64_t m = t * kRows; m < std::min(M, (t + 1) * kRows); ++m) {
      const T* row = x + m * K;
      T* out = y + m * K;
      __m256 squares = _mm256_setzero_ps();
      int64_t k = 0;
#ifdef LOOPCODER_WIDE
      __m512 wide = _mm512_setzero_ps();
      for (; k + 16 <= K; k += 16) wide = _mm512_fmadd_ps(load16(row + k), load16(row + k), wide);
      squares = _mm256_add_ps(_mm512_castps512_ps256(wide), _mm512_extractf32x8_ps(wide, 1));
#endif
      for (; k + 8 <= K; k += 8) squares = _mm256_fmadd_ps(load8(row + k), load8(row + k), squares);
      float ss = hsum(squares);
      for (; k < K; ++k) ss += static_cast<float>(row[k]) * static_cast<float>(row[k]);
      float r = 1.0f / std::sqrt(ss / K + eps);
      const __m256 rv = _mm256_set1_ps(r);
      k = 0;
#ifdef LOOPCODER_WIDE
      for (const __m512 rw = _mm512_set1_ps(r); k + 16 <= K; k += 16)
        store16(out + k, round16<T>(_mm512_mul_ps(load16(w + k), round16<T>(_mm512_mul_ps(load16(row + k), rw)))));
#endif
      for (; k + 8 <= K; k += 8) store8(out + k, round8<T>(_mm256_mul_ps(load8(w + k), round8<T>(_mm256_mul_ps(load8(row + k), rv)))));
      for (; k < K; ++k) out[k] = static_cast<T>(static_cast<float>(w[k]) * rnd<T>(static_cast<float>(row[k]) * r));
    }
  });
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous() && x.size(1) == w.size(0), "rms_norm: x [M, K], w [K]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x and w must share a dtype");
  auto y = torch::empty_like(x);
  if (x.scalar_type() == torch::kBFloat16) {
    rms_norm_typed(x.data_ptr<BF16>(), w.data_ptr<BF16>(), y.data_ptr<BF16>(), x.size(0), x.size(1), static_cast<float>(eps));
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat, "rms_norm: bfloat16 or float32");
    rms_norm_typed(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), x.size(0), x.size(1), static_cast<float>(eps));
  }
  return y;
}

// One head: dst = src * cos + rotate_half(src) * sin, each product and the sum rounded to T (8 lanes
// at a time where half the head is a multiple of 8).
template <typename T>
inline void rope_head(const T* src, const T* cos, const T* sin, T* dst, int64_t D) {
  int64_t half = D / 2;
  if (half % 8 == 0) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t d = 0; d < half; d += 8) {
      __m256 x1 = load8(src + d), x2 = load8(src + half + d);
      __m256 a = round8<T>(_mm256_mul_ps(x1, load8(cos + d))), b = round8<T>(_mm256_mul_ps(_mm256_xor_ps(x2, sign), load8(sin + d)));
      store8(dst + d, round8<T>(_mm256_add_ps(a, b)));
      a = round8<T>(_mm256_mul_ps(x2, load8(cos + half + d))), b = round8<T>(_mm256_mul_ps(x1, load8(sin + half + d)));
      store8(dst + half + d, round8<T>(_mm256_add_ps(a, b)));
    }
    return;
  }
  for (int64_t d = 0; d < D; ++d) {
    float rot = d < half ? -static_cast<float>(src[d + half]) : static_cast<float>(src[d - half]);
    float a = rnd<T>(static_cast<float>(src[d]) * static_cast<float>(cos[d]));
    float b = rnd<T>(rot * static_cast<float>(sin[d]));
    dst[d] = static_cast<T>(a + b);
  }
}

// Rows of a step in tiles of 16 over the threads (a decode step's few rows on the calling thread).
template <typename T>
void rope_qkv_typed(const T* qkv, const T* cos, const T* sin, T* q, T* k, T* v, int64_t M, int64_t H, int64_t KVH, int64_t D) {
  int64_t width = (H + 2 * KVH) * D;
  for_each_tile((M + 15) / 16, [&](int64_t t) {
    for (int64_t m = t * 16; m < std::min(M, (t + 1) * 16); ++m) {
      const T* row = qkv + m * width;
      const T* c = cos + m * D;
      const T* s = sin + m * D;
      for (int64_t h = 0; h < H; ++h) rope_head(row + h * D, c, s, q + (m * H + h) * D, D);
      for (int64_t h = 0; h < KVH; ++h) rope_head(row + (H + h) * D, c, s, k + (m * KVH + h) * D, D);
      std::copy(row + (H + KVH) * D, row + width, v + m * KVH * D);
    }
  }, M < 64);
}

std::vector<torch::Tensor> rope_qkv(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, int64_t H, int64_t KVH) {
  int64_t M = qkv.size(0), D = cos.size(1);
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (H + 2 * KVH) * D, "rope_qkv: qkv [M, (H + 2 KVH) D]");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == M && sin.sizes() == cos.sizes(), "rope_qkv: cos/sin [M, D]");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(), "rope_qkv: one dtype");
  auto q = torch::empty({M, H, D}, qkv.options());
  auto k = torch::empty({M, KVH, D}, qkv.options());
  auto v = torch::empty({M, KVH, D}, qkv.options());
  if (qkv.scalar_type() == torch::kBFloat16) {
    rope_qkv_typed(qkv.data_ptr<BF16>(), cos.data_ptr<BF16>(), sin.data_ptr<BF16>(), q.data_ptr<BF16>(), k.data_ptr<BF16>(),
                   v.data_ptr<BF16>(), M, H, KVH, D);
  } else {
    TORCH_CHECK(qkv.scalar_type() == torch::kFloat, "rope_qkv: bfloat16 or float32");
    rope_qkv_typed(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), q.data_ptr<float>(), k.data_ptr<float>(),
                   v.data_ptr<float>(), M, H, KVH, D);
  }
  return {q, k, v};
}

// ---- paged decode attention -------------------------------------------------------------------

// Where one sequence's keys/values live: flat cache [S, KVH, D] and its block table.
template <typename T>
struct PagedKV {
  const T* keys;
  const T* values;
  const int64_t* table;  // [B, table_width]
  int64_t table_width, block_size, kv_heads, head_dim;

  inline int64_t offset(int64_t b, int64_t pos, int64_t kvh) const {
    int64_t slot = table[b * table_width + pos / block_size] * block_size + pos % block_size;
    return (slot * kv_heads + kvh) * head_dim;
  }
};

// Where the rows (keys or values) of KV head kvh for positions first..last of sequence b start,
// walking the block table once instead of dividing by the block size per position.
template <typename T>
void row_pointers(const T* base, const PagedKV<T>& kv, int64_t b, int64_t kvh, int64_t first, int64_t last, std::vector<const T*>& rows) {
  rows.resize(last - first + 1);
  const int64_t* table = kv.table + b * kv.table_width;
  int64_t block = first / kv.block_size, in_block = first % kv.block_size;
  for (auto& row : rows) {
    row = base + ((table[block] * kv.block_size + in_block) * kv.kv_heads + kvh) * kv.head_dim;
    if (++in_block == kv.block_size) in_block = 0, ++block;
  }
}

// The sums of four vectors' lanes, in one vector: three horizontal adds instead of four full reductions.
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// out[g] = sum_j p[g][j] v[j] for GN query heads at once, each head's 8 outputs held in a register
// across all the positions.
template <int GN, typename T>
inline void weigh_values(const float* p, int64_t n, const std::vector<const T*>& values, int64_t D, float* out) {
  for (int64_t d = 0; d < D; d += 8) {
    __m256 acc[GN];
    for (int g = 0; g < GN; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      __m256 v = load8(values[j] + d);
      for (int g = 0; g < GN; ++g) acc[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + g * n + j), v, acc[g]);
    }
    for (int g = 0; g < GN; ++g) _mm256_storeu_ps(out + g * D + d, acc[g]);
  }
}

// softmax(q k^T * scale) v for the G query heads sharing KV head kvh, over positions [first, last].
template <typename T>
void attend_positions(const float* q, int64_t G, const PagedKV<T>& kv, int64_t b, int64_t kvh, int64_t first, int64_t last,
                      float scale, std::vector<float>& scores, float* out) {
  thread_local std::vector<const T*> keys, values;
  int64_t D = kv.head_dim, n = last - first + 1;
  scores.resize(G * n);
  row_pointers(kv.keys, kv, b, kvh, first, last, keys);
  row_pointers(kv.values, kv, b, kvh, first, last, values);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4)
    for (int64_t g = 0; g < G; ++g) {
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t d = 0; d < D; d += 8) {
        __m256 qv = _mm256_loadu_ps(q + g * D + d);
        for (int i = 0; i < 4; ++i) acc[i] = _mm256_fmadd_ps(load8(keys[j + i] + d), qv, acc[i]);
      }
      _mm_storeu_ps(scores.data() + g * n + j, _mm_mul_ps(hsum4(acc[0], acc[1], acc[2], acc[3]), _mm_set1_ps(scale)));
    }
  for (; j < n; ++j)
    for (int64_t g = 0; g < G; ++g) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(load8(keys[j] + d), _mm256_loadu_ps(q + g * D + d), acc);
      scores[g * n + j] = hsum(acc) * scale;
    }
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores.data() + g * n;
    float top = *std::max_element(s, s + n);
    __m256 sum = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), _mm256_set1_ps(top)));
      _mm256_storeu_ps(s + i, e);
      sum = _mm256_add_ps(sum, e);
    }
    float total = hsum(sum);
    for (; i < n; ++i) total += (s[i] = std::exp(s[i] - top));
    float inv = 1.0f / total;
    for (i = 0; i < n; ++i) s[i] *= inv;
  }
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) weigh_values<4>(scores.data() + g * n, n, values, D, out + g * D);
  switch (G - g) {
    case 3: weigh_values<3>(scores.data() + g * n, n, values, D, out + g * D); break;
    case 2: weigh_values<2>(scores.data() + g * n, n, values, D, out + g * D); break;
    case 1: weigh_values<1>(scores.data() + g * n, n, values, D, out + g * D); break;
  }
}

#ifdef LOOPCODER_WIDE
// Lane i: the sum of a[i]'s 16 lanes, the 16 reduced together in a tree of shuffles and adds.
inline __m512 sums16(const __m512 (&a)[16]) {
  __m512 x[8], t[4];
  for (int i = 0; i < 8; ++i) x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    t[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(t[0], t[1], 0x44), _mm512_shuffle_f32x4(t[0], t[1], 0xEE));
  __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(t[2], t[3], 0x44), _mm512_shuffle_f32x4(t[2], t[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

// attend_positions for bf16 with D a multiple of 32, on vdpbf16ps straight from the cache rows: each
// score is a dot product of 32-dimension pairs reduced 16 keys at a time (sums16); the values of two
// keys are interleaved (unpacklo/hi) and multiplied by the pair of their probabilities, rounded to
// bf16 as PyTorch's flash attention rounds them, and the outputs put back in dimension order.
void attend_positions_wide(const BF16* q, int64_t G, const PagedKV<BF16>& kv, int64_t b, int64_t kvh, int64_t first, int64_t last,
                           float scale, std::vector<float>& scores, float* out) {
  thread_local std::vector<const BF16*> keys, values;
  thread_local std::vector<BF16> probs;
  thread_local std::vector<float> inv;  // 1 / each head's softmax denominator
  int64_t D = kv.head_dim, n = last - first + 1, padded = round_up(n, 16);
  scores.resize(G * padded);
  probs.assign(G * (padded + 1), BF16(0.0f));  // a zero past the last key pairs up an odd count
  row_pointers(kv.keys, kv, b, kvh, first, last, keys);
  row_pointers(kv.values, kv, b, kvh, first, last, values);
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t g = 0; g < G; ++g) {
    const BF16* qg = q + g * D;
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) {
        acc[i] = _mm512_setzero_ps();
        if (j0 + i < n)
          for (int64_t d = 0; d < D; d += 32)
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(keys[j0 + i] + d), (__m512bh)_mm512_loadu_si512(qg + d));
      }
      _mm512_storeu_ps(scores.data() + g * padded + j0, _mm512_mul_ps(sums16(acc), sv));
    }
  }
  inv.resize(G);
  for (int64_t g = 0; g < G; ++g) {
    const float* s = scores.data() + g * padded;
    BF16* p = probs.data() + g * (padded + 1);
    float top = *std::max_element(s, s + n);
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      __mmask16 live = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
      __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), _mm512_set1_ps(top))));
      total = _mm512_add_ps(total, e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(e));
    }
    inv[g] = 1.0f / _mm512_reduce_add_ps(total);
  }
  const __m512i first16 = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i second16 = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  for (int64_t d = 0; d < D; d += 32) {
    for (int64_t g0 = 0; g0 < G; g0 += 4) {
      int64_t gn = std::min<int64_t>(4, G - g0);
      __m512 lo[4] = {}, hi[4] = {};
      for (int64_t j = 0; j < n; j += 2) {
        __m512i v0 = _mm512_loadu_si512(values[j] + d);
        __m512i v1 = j + 1 < n ? _mm512_loadu_si512(values[j + 1] + d) : _mm512_setzero_si512();
        __m512bh l = (__m512bh)_mm512_unpacklo_epi16(v0, v1), h = (__m512bh)_mm512_unpackhi_epi16(v0, v1);
        for (int64_t g = 0; g < gn; ++g) {
          __m512bh pp = pair_of(probs.data() + (g0 + g) * (padded + 1) + j);
          lo[g] = _mm512_dpbf16_ps(lo[g], l, pp);
          hi[g] = _mm512_dpbf16_ps(hi[g], h, pp);
        }
      }
      for (int64_t g = 0; g < gn; ++g) {  // lane 4k + m of lo is dimension 8k + m, of hi 8k + 4 + m
        __m512 w = _mm512_set1_ps(inv[g0 + g]);
        _mm512_storeu_ps(out + (g0 + g) * D + d, _mm512_mul_ps(_mm512_permutex2var_ps(lo[g], first16, hi[g]), w));
        _mm512_storeu_ps(out + (g0 + g) * D + d + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo[g], second16, hi[g]), w));
      }
    }
  }
}
#endif

template <typename T>
PagedKV<T> paged(const torch::Tensor& keys, const torch::Tensor& values, const torch::Tensor& table, int64_t block_size) {
  TORCH_CHECK(keys.dim() == 3 && keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes(), "keys/values [S, KVH, D]");
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous() && table.scalar_type() == torch::kLong, "block table [B, blocks] int64");
  return {keys.data_ptr<T>(), values.data_ptr<T>(), table.data_ptr<int64_t>(), table.size(1), block_size, keys.size(1), keys.size(2)};
}

inline int64_t window_start(int64_t pos, int64_t window) { return window > 0 ? std::max<int64_t>(pos - window + 1, 0) : 0; }

// A later loop's mix of its branches for heads h0..h0+G-1 of one token (q, global a, local l: [G, D],
// fp32 or T): g * a + (1 - g) * l with g = sigmoid(q . gate_w[h] + gate_b[h]), each op rounded to T as
// the plain path's ops round (the branches too, where they arrive in fp32).
template <typename T, typename In>
void mix_heads(const In* q, const In* a, const In* l, int64_t G, int64_t h0, int64_t D, const T* gate_w, const T* gate_b, T* dst) {
  int64_t body = D / 8 * 8;
  for (int64_t g = 0; g < G; ++g) {
    int64_t h = h0 + g;
    const In *qg = q + g * D, *ag = a + g * D, *lg = l + g * D;
    const T* w = gate_w + h * D;
    __m256 dot = _mm256_setzero_ps();
    for (int64_t d = 0; d < body; d += 8) dot = _mm256_fmadd_ps(load8(qg + d), load8(w + d), dot);
    float logit = static_cast<float>(gate_b[h]) + hsum(dot);
    for (int64_t d = body; d < D; ++d) logit += static_cast<float>(qg[d]) * static_cast<float>(w[d]);
    float gate = rnd<T>(1.0f / (1.0f + std::exp(-logit))), rest = rnd<T>(1.0f - gate);
    __m256 gv = _mm256_set1_ps(gate), rv = _mm256_set1_ps(rest);
    for (int64_t d = 0; d < body; d += 8) {
      __m256 x = round8<T>(_mm256_mul_ps(gv, round8<T>(load8(ag + d)))), y = round8<T>(_mm256_mul_ps(rv, round8<T>(load8(lg + d))));
      store8(dst + g * D + d, round8<T>(_mm256_add_ps(x, y)));
    }
    for (int64_t d = body; d < D; ++d) {
      float x = rnd<T>(gate * rnd<T>(static_cast<float>(ag[d]))), y = rnd<T>(rest * rnd<T>(static_cast<float>(lg[d])));
      dst[g * D + d] = static_cast<T>(x + y);
    }
  }
}

// mix_heads over whole rows q, a, l [N, H, D] (a prompt's later loop, its branches computed apart).
torch::Tensor gate_mix(const torch::Tensor& q, const torch::Tensor& a, const torch::Tensor& l, const torch::Tensor& gate_w,
                       const torch::Tensor& gate_b) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && a.is_contiguous() && l.is_contiguous() && a.sizes() == q.sizes() &&
              l.sizes() == q.sizes() && a.scalar_type() == q.scalar_type() && l.scalar_type() == q.scalar_type(),
              "gate_mix: contiguous q, global, local [N, H, D] of one dtype");
  int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(gate_w.is_contiguous() && gate_w.dim() == 2 && gate_w.size(0) == H && gate_w.size(1) == D && gate_b.is_contiguous() &&
              gate_b.dim() == 1 && gate_b.size(0) == H && gate_w.scalar_type() == q.scalar_type() && gate_b.scalar_type() == q.scalar_type(),
              "gate_mix: gate [H, D] and [H] in q's dtype");
  auto out = torch::empty_like(q);
  auto run = [&](auto* qp, auto* ap, auto* lp, auto* wp, auto* bp, auto* op) {
    for_each_tile((N + 15) / 16, [&](int64_t t) {
      for (int64_t n = t * 16; n < std::min(N, (t + 1) * 16); ++n)
        mix_heads(qp + n * H * D, ap + n * H * D, lp + n * H * D, H, 0, D, wp, bp, op + n * H * D);
    });
  };
  if (q.scalar_type() == torch::kBFloat16) {
    run(q.data_ptr<BF16>(), a.data_ptr<BF16>(), l.data_ptr<BF16>(), gate_w.data_ptr<BF16>(), gate_b.data_ptr<BF16>(), out.data_ptr<BF16>());
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kFloat, "gate_mix: bfloat16 or float32");
    run(q.data_ptr<float>(), a.data_ptr<float>(), l.data_ptr<float>(), gate_w.data_ptr<float>(), gate_b.data_ptr<float>(), out.data_ptr<float>());
  }
  return out;
}

// Decode queries q[rows[b]] at positions[b] over the keys at positions window_start..pos of `kv`.
// With `local` and a gate (a later loop): g * that + (1 - g) * the window over `local`.
template <typename T>
torch::Tensor decode_attention_typed(const torch::Tensor& q, const torch::Tensor& rows, const torch::Tensor& positions, const PagedKV<T>& kv,
                                     int64_t kv_window, const PagedKV<T>* local, int64_t window, const T* gate_w, const T* gate_b) {
  int64_t B = rows.size(0), H = q.size(1), D = q.size(2), KVH = kv.kv_heads, G = H / KVH;
  auto out = torch::empty({B, H, D}, q.options());
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  float scale = 1.0f / std::sqrt(static_cast<float>(D));
  int64_t keys = 0;  // keys read in all: below ~65K multiply-adds a thread hand-off costs more than it saves
  for (int64_t b = 0; b < B; ++b) keys += pp[b] - window_start(pp[b], kv_window) + 1 + (local ? std::min(pp[b] + 1, window) : 0);
  bool serial = keys * H * D < (1 << 16);
  for_each_tile(B * KVH, [&](int64_t item) {
    int64_t b = item / KVH, kvh = item % KVH, pos = pp[b];
    thread_local std::vector<float> qf, a, l, scores;  // reused: no allocation per item
    qf.resize(G * D);
    a.resize(G * D);
    l.resize(G * D);
    const T* qrow = qp + (rp[b] * H + kvh * G) * D;
    for (int64_t i = 0; i < G * D; ++i) qf[i] = static_cast<float>(qrow[i]);
    auto attend = [&](const PagedKV<T>& cache, int64_t from, float* dst) {
#ifdef LOOPCODER_WIDE
      if constexpr (std::is_same<T, BF16>::value) {
        if (D % 32 == 0) return attend_positions_wide(qrow, G, cache, b, kvh, from, pos, scale, scores, dst);
      }
#endif
      attend_positions(qf.data(), G, cache, b, kvh, from, pos, scale, scores, dst);
    };
    attend(kv, window_start(pos, kv_window), a.data());
    T* dst = op + (b * H + kvh * G) * D;
    if (!local) {
      for (int64_t i = 0; i < G * D; ++i) dst[i] = static_cast<T>(a[i]);
      return;
    }
    attend(*local, window_start(pos, window), l.data());
    mix_heads(qf.data(), a.data(), l.data(), G, kvh * G, D, gate_w, gate_b, dst);
  }, serial);
  return out;
}

// The cache write of a decode step: row rows[b] of k_new/v_new [N, KVH, D] goes to the slot of positions[b].
template <typename T>
void write_new(const torch::Tensor& keys, const torch::Tensor& values, const PagedKV<T>& kv, const c10::optional<torch::Tensor>& k_new,
               const c10::optional<torch::Tensor>& v_new, const torch::Tensor& rows, const torch::Tensor& positions) {
  if (!k_new) return;
  TORCH_CHECK(v_new && k_new->is_contiguous() && v_new->is_contiguous() && k_new->scalar_type() == keys.scalar_type() &&
              k_new->sizes() == v_new->sizes() && k_new->size(1) == kv.kv_heads && k_new->size(2) == kv.head_dim, "k_new/v_new [N, KVH, D]");
  int64_t width = kv.kv_heads * kv.head_dim;
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows.size(0); ++b) {
    int64_t at = kv.offset(b, pp[b], 0), from = rp[b] * width;
    std::copy(k_new->data_ptr<T>() + from, k_new->data_ptr<T>() + from + width, keys.data_ptr<T>() + at);
    std::copy(v_new->data_ptr<T>() + from, v_new->data_ptr<T>() + from + width, values.data_ptr<T>() + at);
  }
}

void check_queries(const torch::Tensor& q, const torch::Tensor& rows, const torch::Tensor& positions, const torch::Tensor& keys) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.size(2) % 8 == 0, "q [N, H, D] with D a multiple of 8");
  TORCH_CHECK(keys.scalar_type() == q.scalar_type() && keys.size(2) == q.size(2) && q.size(1) % keys.size(1) == 0, "q and cache disagree");
  TORCH_CHECK(rows.scalar_type() == torch::kLong && positions.scalar_type() == torch::kLong && rows.is_contiguous() &&
              positions.is_contiguous() && rows.size(0) == positions.size(0), "rows/positions [B] int64");
}

template <typename T>
torch::Tensor ungated_typed(const torch::Tensor& q, const torch::Tensor& rows, const torch::Tensor& positions, const torch::Tensor& keys,
                          const torch::Tensor& values, const torch::Tensor& table, int64_t block_size, int64_t window,
                          const c10::optional<torch::Tensor>& k_new, const c10::optional<torch::Tensor>& v_new) {
  PagedKV<T> kv = paged<T>(keys, values, table, block_size);
  write_new<T>(keys, values, kv, k_new, v_new, rows, positions);
  return decode_attention_typed<T>(q, rows, positions, kv, window, nullptr, 0, nullptr, nullptr);
}

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& rows, const torch::Tensor& positions, const torch::Tensor& keys,
                               const torch::Tensor& values, const torch::Tensor& table, int64_t block_size, int64_t window,
                               const c10::optional<torch::Tensor>& k_new, const c10::optional<torch::Tensor>& v_new) {
  check_queries(q, rows, positions, keys);
  if (q.scalar_type() == torch::kBFloat16) return ungated_typed<BF16>(q, rows, positions, keys, values, table, block_size, window, k_new, v_new);
  TORCH_CHECK(q.scalar_type() == torch::kFloat, "decode_attention: bfloat16 or float32");
  return ungated_typed<float>(q, rows, positions, keys, values, table, block_size, window, k_new, v_new);
}

template <typename T>
torch::Tensor gated_typed(const torch::Tensor& q, const torch::Tensor& rows, const torch::Tensor& positions, const torch::Tensor& keys,
                          const torch::Tensor& values, const torch::Tensor& table, const torch::Tensor& local_keys,
                          const torch::Tensor& local_values, const torch::Tensor& local_table, int64_t block_size, int64_t window,
                          const torch::Tensor& gate_w, const torch::Tensor& gate_b, const c10::optional<torch::Tensor>& k_new,
                          const c10::optional<torch::Tensor>& v_new) {
  PagedKV<T> local = paged<T>(local_keys, local_values, local_table, block_size);
  write_new<T>(local_keys, local_values, local, k_new, v_new, rows, positions);
  return decode_attention_typed<T>(q, rows, positions, paged<T>(keys, values, table, block_size), 0, &local, window, gate_w.data_ptr<T>(),
                                   gate_b.data_ptr<T>());
}

torch::Tensor gated_decode_attention(const torch::Tensor& q, const torch::Tensor& rows, const torch::Tensor& positions,
                                     const torch::Tensor& keys, const torch::Tensor& values, const torch::Tensor& table,
                                     const torch::Tensor& local_keys, const torch::Tensor& local_values, const torch::Tensor& local_table,
                                     int64_t block_size, int64_t window, const torch::Tensor& gate_w, const torch::Tensor& gate_b,
                                     const c10::optional<torch::Tensor>& k_new, const c10::optional<torch::Tensor>& v_new) {
  check_queries(q, rows, positions, keys);
  TORCH_CHECK(local_keys.dim() == 3 && local_keys.size(1) == keys.size(1) && local_keys.size(2) == keys.size(2), "local cache [S, KVH, D]");
  TORCH_CHECK(gate_w.is_contiguous() && gate_w.size(0) == q.size(1) && gate_w.size(1) == q.size(2) && gate_b.is_contiguous() &&
              gate_b.size(0) == q.size(1) && gate_w.scalar_type() == q.scalar_type() && gate_b.scalar_type() == q.scalar_type(),
              "gate [H, D] and [H] in q's dtype");
  if (q.scalar_type() == torch::kBFloat16)
    return gated_typed<BF16>(q, rows, positions, keys, values, table, local_keys, local_values, local_table, block_size, window, gate_w,
                             gate_b, k_new, v_new);
  TORCH_CHECK(q.scalar_type() == torch::kFloat, "gated_decode_attention: bfloat16 or float32");
  return gated_typed<float>(q, rows, positions, keys, values, table, local_keys, local_values, local_table, block_size, window, gate_w,
                            gate_b, k_new, v_new);
}

#ifdef LOOPCODER_WIDE
// ---- prefill attention: causal, or within a window (AVX-512 builds) ---------------------------
//
// softmax(q k^T / sqrt(D)) v for T new tokens at positions first..first+T-1 over the keys at
// positions key_first..first+T-1, each query seeing the keys at or before its position (and, with
// a window W, after its position - W: a later loop's local branch). Flash style: four
// query rows at a time keep a running max and sum over chunks of 64 keys, so scores never leave
// L1. Both products run on vdpbf16ps. The keys are laid out per 16 keys as (d, d+1) pairs, so one
// register holds a pair of dimensions for 16 keys and a broadcast query pair multiplies all 16;
// the values as (j, j+1) pairs for 16 dimensions, multiplied by a broadcast pair of
// probabilities. The probabilities are rounded to bf16 for that product, as PyTorch's flash
// attention on the CPU rounds them; the scores, sums and outputs stay in fp32.
// Register tiles (measured best among 4-8 rows x 32-64 keys on Zen 5): 16 score and 16 output sums.
constexpr int kKeyBlocks = 4;                   // registers of 16 keys per step of the running softmax
constexpr int64_t kKeyChunk = 16 * kKeyBlocks;  // keys per step
constexpr int kQueryRows = 4;                   // query rows (token, head) sharing each key and value load
constexpr int kDimBlocks = 4;                   // registers of 16 output dimensions per pass over a chunk's values
constexpr int64_t kTokensPerItem = 16;

// 2^x on 16 lanes: 2^n times a degree-5 polynomial in x - n, |x - n| <= 1/2 (fitted here for relative
// error, 2.3e-7 evaluated in fp32: about 2 ulp); vscalefps applies 2^n, going to 0 far below -126
// (masked-out scores, a first max).
constexpr float kExp2Poly[] = {1.3276452664e-3f, 9.6755418926e-3f, 5.5507134646e-2f, 2.4022120237e-1f, 6.9314694405e-1f, 1.0000001192f};
inline __m512 exp2_16(__m512 x) {
  __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExp2Poly[i]));
  return _mm512_scalef_ps(p, n);
}

// Lanes 4r..4r+3: the max of v[r]'s 16 lanes, for the four rows of a tile at once.
inline __m512 row_maxes(const __m512 (&v)[4]) {
  __m512 ab = _mm512_max_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x44), _mm512_shuffle_f32x4(v[0], v[1], 0xEE));
  __m512 cd = _mm512_max_ps(_mm512_shuffle_f32x4(v[2], v[3], 0x44), _mm512_shuffle_f32x4(v[2], v[3], 0xEE));
  __m512 m = _mm512_max_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  m = _mm512_max_ps(m, _mm512_permute_ps(m, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm512_max_ps(m, _mm512_permute_ps(m, _MM_SHUFFLE(2, 3, 0, 1)));
}

// Lane 4r of v in all 16 lanes (row r's value, from a row_maxes layout).
inline __m512 row_value(__m512 v, int r) { return _mm512_permutexvar_ps(_mm512_set1_epi32(4 * r), v); }

// Each KV head's keys and values in the pair layouts above, read through the sequence's slots;
// positions past the last key are zero (and never visible).
struct PairedKV {
  std::vector<BF16> keys, values;  // [keys / 16][D / 2][16][2], [keys / 2][D][2]
  int64_t D;

  // Where pair dp of 16-key block `block` starts in `keys`, and dimension d of key pair jp in `values`.
  int64_t key_at(int64_t block, int64_t dp) const { return (block * (D / 2) + dp) * 32; }
  int64_t value_at(int64_t jp, int64_t d) const { return (jp * D + d) * 2; }
  const BF16* key_pairs(int64_t block, int64_t dp) const { return keys.data() + key_at(block, dp); }
  const BF16* value_pairs(int64_t jp, int64_t d) const { return values.data() + value_at(jp, d); }
};

void pair_up(std::vector<PairedKV>& paired, const BF16* keys, const BF16* values, const int64_t* slots, int64_t L, int64_t KVH, int64_t D) {
  int64_t padded = round_up(L, kKeyChunk);
  for (auto& kv : paired) {
    kv.D = D;
    kv.keys.assign(padded * D, BF16(0.0f));
    kv.values.assign(padded * D, BF16(0.0f));
  }
  for_each_tile(KVH * (padded / kKeyChunk), [&](int64_t item) {  // work items of one head's chunk of keys
    int64_t h = item % KVH, j0 = item / KVH * kKeyChunk;
    PairedKV& kv = paired[h];
    for (int64_t j = j0; j < std::min(L, j0 + kKeyChunk); ++j) {
      const BF16* k = keys + (slots[j] * KVH + h) * D;
      for (int64_t dp = 0; dp < D / 2; ++dp) std::memcpy(kv.keys.data() + kv.key_at(j / 16, dp) + j % 16 * 2, k + 2 * dp, 2 * sizeof(BF16));
    }
    for (int64_t j = j0; j < std::min(L, j0 + kKeyChunk); j += 2) {  // two keys' values interleaved, 16 dimensions at a time
      const BF16* v0 = values + (slots[j] * KVH + h) * D;
      const BF16* v1 = j + 1 < L ? values + (slots[j + 1] * KVH + h) * D : nullptr;
      for (int64_t d = 0; d < D; d += 16) {
        __m512i even = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + d)));
        __m512i odd = v1 ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + d))), 16)
                         : _mm512_setzero_si512();
        _mm512_storeu_si512(kv.values.data() + kv.value_at(j / 2, d), _mm512_or_si512(even, odd));
      }
    }
  });
}

// Rows (token, head) of one query tile: where each query starts, the first and last key it sees,
// and its running softmax: max, sums (16 lanes each, reduced at the end) and unnormalized output.
struct QueryTile {
  const BF16* q[kQueryRows];
  int64_t lo[kQueryRows], hi[kQueryRows];
  int64_t lowest, highest_lo, lowest_hi, last;  // over the rows: where the keys it sees start and end
  float max[16];  // row r's in lanes 4r..4r+3 (row_maxes)
  float sums[kQueryRows][16];
  float* out;  // [kQueryRows][D] fp32
};

// q . k of the tile's rows against B blocks of 16 keys from j0. Not inlined: inside its caller, GCC 12
// kept these sums in memory and stored all 16 on every step (the scores took 1.5x the time of the
// same number of products against the values).
template <int64_t D, int B>
__attribute__((noinline)) void chunk_scores(const QueryTile& t, const PairedKV& kv, int64_t j0, __m512 (&s)[kQueryRows][kKeyBlocks]) {
  __m512 acc[kQueryRows][B];
  for (int r = 0; r < kQueryRows; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t dp = 0; dp < D / 2; ++dp) {
    __m512bh k[B];
    for (int b = 0; b < B; ++b) k[b] = (__m512bh)_mm512_loadu_si512(kv.key_pairs(j0 / 16 + b, dp));
    for (int r = 0; r < kQueryRows; ++r) {
      __m512bh qp = pair_of(t.q[r] + 2 * dp);
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], k[b], qp);
    }
  }
  for (int r = 0; r < kQueryRows; ++r)
    for (int b = 0; b < B; ++b) s[r][b] = acc[r][b];
}

// One chunk of B blocks of 16 keys from j0 for one tile (B < 4 where the tile's last key comes
// sooner). The running softmax works in base 2 on unscaled scores: e^(scale (s - max)) =
// 2^(s c - max c) with c = scale log2(e), one fused multiply-subtract per 16 scores; a new max
// rescales the outputs as the value pass loads them.
template <int64_t D, int B>
void attend_blocks(QueryTile& t, const PairedKV& kv, int64_t j0, float c, BF16* probs) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512 s[kQueryRows][kKeyBlocks];
  chunk_scores<D, B>(t, kv, j0, s);
  bool masked = j0 < t.highest_lo || j0 + 16 * B - 1 > t.lowest_hi;
  __mmask16 seen[kQueryRows][kKeyBlocks];
  __m512 tops[kQueryRows];
  for (int r = 0; r < kQueryRows; ++r) {
    tops[r] = _mm512_set1_ps(-INFINITY);
    for (int b = 0; b < B; ++b) {
      __m512i key = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(j0 + 16 * b)));
      seen[r][b] = masked ? _mm512_cmple_epi32_mask(key, _mm512_set1_epi32(static_cast<int>(t.hi[r]))) &
                                _mm512_cmpge_epi32_mask(key, _mm512_set1_epi32(static_cast<int>(t.lo[r])))
                          : __mmask16(0xFFFF);
      tops[r] = _mm512_mask_max_ps(tops[r], seen[r][b], tops[r], s[r][b]);
    }
  }
  __m512 before = _mm512_loadu_ps(t.max), top = _mm512_max_ps(before, row_maxes(tops)), cv = _mm512_set1_ps(c);
  _mm512_storeu_ps(t.max, top);
  __m512 alpha = exp2_16(_mm512_mul_ps(_mm512_sub_ps(before, top), cv)), shift = _mm512_mul_ps(top, cv);
  for (int r = 0; r < kQueryRows; ++r) {
    __m512 mc = row_value(shift, r), total = _mm512_setzero_ps();
    for (int b = 0; b < B; ++b) {
      __m512 e = _mm512_maskz_mov_ps(seen[r][b], exp2_16(_mm512_fmsub_ps(s[r][b], cv, mc)));
      total = _mm512_add_ps(total, e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + r * kKeyChunk + 16 * b), (__m256i)_mm512_cvtneps_pbh(e));
    }
    _mm512_storeu_ps(t.sums[r], _mm512_fmadd_ps(_mm512_loadu_ps(t.sums[r]), row_value(alpha, r), total));
  }
  int64_t pairs = (std::min(t.last, j0 + 16 * B - 1) - j0) / 2 + 1;
  for (int64_t d0 = 0; d0 < D; d0 += 16 * kDimBlocks) {
    __m512 o[kQueryRows][kDimBlocks];
    for (int r = 0; r < kQueryRows; ++r)
      for (int i = 0; i < kDimBlocks; ++i) o[r][i] = _mm512_mul_ps(_mm512_loadu_ps(t.out + r * D + d0 + 16 * i), row_value(alpha, r));
    for (int64_t jp = 0; jp < pairs; ++jp) {
      __m512bh v[kDimBlocks];
      for (int i = 0; i < kDimBlocks; ++i) v[i] = (__m512bh)_mm512_loadu_si512(kv.value_pairs(j0 / 2 + jp, d0 + 16 * i));
      for (int r = 0; r < kQueryRows; ++r) {
        __m512bh pp = pair_of(probs + r * kKeyChunk + 2 * jp);
        for (int i = 0; i < kDimBlocks; ++i) o[r][i] = _mm512_dpbf16_ps(o[r][i], v[i], pp);
      }
    }
    for (int r = 0; r < kQueryRows; ++r)
      for (int i = 0; i < kDimBlocks; ++i) _mm512_storeu_ps(t.out + r * D + d0 + 16 * i, o[r][i]);
  }
}

// The keys from j0 up to 64 of them, as far as the tile's last key.
template <int64_t D>
void attend_chunk(QueryTile& t, const PairedKV& kv, int64_t j0, float c, BF16* probs) {
  switch (std::min<int64_t>(kKeyBlocks, (t.last - j0) / 16 + 1)) {
    case 1: return attend_blocks<D, 1>(t, kv, j0, c, probs);
    case 2: return attend_blocks<D, 2>(t, kv, j0, c, probs);
    case 3: return attend_blocks<D, 3>(t, kv, j0, c, probs);
    default: return attend_blocks<D, 4>(t, kv, j0, c, probs);
  }
}

// A work item is 16 tokens x the query heads of one KV head: its tiles take each chunk of keys and
// values in turn while the chunk sits in L1 (tile after tile over all chunks read them from L2 once
// per tile).
template <int64_t D>
void prefill_attention_d(const BF16* q, const BF16* keys, const BF16* values, const int64_t* slots, int64_t L, int64_t first, int64_t T,
                         int64_t H, int64_t KVH, int64_t window, int64_t key_first, BF16* out) {
  int64_t G = H / KVH, blocks = (T + kTokensPerItem - 1) / kTokensPerItem;
  std::vector<PairedKV> paired(KVH);
  pair_up(paired, keys, values, slots, L, KVH, D);
  const float c = 1.44269504088896341f / std::sqrt(static_cast<float>(D));  // scale log2(e)
  for_each_tile(KVH * blocks, [&](int64_t item) {
    int64_t h = item / blocks, block = blocks - 1 - item % blocks;  // a head at a time (its keys stay in L2), the longest rows first
    int64_t t0 = block * kTokensPerItem, rows = (std::min(T, t0 + kTokensPerItem) - t0) * G;
    int64_t count = (rows + kQueryRows - 1) / kQueryRows;
    thread_local std::vector<float> acc;
    thread_local std::vector<BF16> probs;
    thread_local std::vector<QueryTile> tiles;
    acc.assign(count * kQueryRows * D, 0.0f);
    probs.resize(kQueryRows * kKeyChunk);
    tiles.resize(count);
    int64_t start = INT64_MAX, end = 0;
    for (int64_t i = 0; i < count; ++i) {
      QueryTile& t = tiles[i];
      t.out = acc.data() + i * kQueryRows * D;
      for (int r = 0; r < kQueryRows; ++r) {
        int64_t row = std::min(i * kQueryRows + r, rows - 1);  // a short last tile repeats its last row
        int64_t token = t0 + row / G, head = h * G + row % G;
        t.q[r] = q + (token * H + head) * D;
        t.hi[r] = first + token - key_first;
        t.lo[r] = window > 0 ? std::max<int64_t>(t.hi[r] - window + 1, 0) : 0;
        std::fill(t.sums[r], t.sums[r] + 16, 0.0f);
      }
      std::fill(t.max, t.max + 16, -1e30f);  // finite: the first rescale is by 2^-huge = 0
      t.lowest = *std::min_element(t.lo, t.lo + kQueryRows), t.highest_lo = *std::max_element(t.lo, t.lo + kQueryRows);
      t.lowest_hi = *std::min_element(t.hi, t.hi + kQueryRows), t.last = *std::max_element(t.hi, t.hi + kQueryRows);
      start = std::min(start, t.lowest / kKeyChunk * kKeyChunk), end = std::max(end, t.last);
    }
    if (window > 0) {  // each tile sees its own window: chunks from the tile's first block of 16 keys, not a multiple of 64
      for (QueryTile& t : tiles)
        for (int64_t j0 = t.lowest / 16 * 16; j0 <= t.last; j0 += kKeyChunk) attend_chunk<D>(t, paired[h], j0, c, probs.data());
    } else {
      for (int64_t j0 = start; j0 <= end; j0 += kKeyChunk)
        for (QueryTile& t : tiles)
          if (j0 <= t.last && j0 + kKeyChunk > t.lowest) attend_chunk<D>(t, paired[h], j0, c, probs.data());
    }
    for (int64_t i = 0; i < count; ++i)
      for (int r = 0; r < kQueryRows && i * kQueryRows + r < rows; ++r) {
        int64_t row = i * kQueryRows + r, token = t0 + row / G, head = h * G + row % G;
        float inv = 1.0f / _mm512_reduce_add_ps(_mm512_loadu_ps(tiles[i].sums[r]));
        const float* o = tiles[i].out + r * D;
        for (int64_t d = 0; d < D; ++d) out[(token * H + head) * D + d] = static_cast<BF16>(o[d] * inv);
      }
  });
}

torch::Tensor prefill_attention(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values, const torch::Tensor& slots,
                                int64_t first, int64_t window, int64_t key_first) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.scalar_type() == torch::kBFloat16, "prefill_attention: q [T, H, D] bf16");
  TORCH_CHECK(keys.dim() == 3 && keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes() &&
              keys.scalar_type() == torch::kBFloat16 && values.scalar_type() == torch::kBFloat16, "prefill_attention: keys/values [S, KVH, D] bf16");
  TORCH_CHECK(slots.dim() == 1 && slots.is_contiguous() && slots.scalar_type() == torch::kLong, "prefill_attention: slots [L] int64");
  int64_t T = q.size(0), H = q.size(1), D = q.size(2), KVH = keys.size(1);
  TORCH_CHECK(keys.size(2) == D && H % KVH == 0 && first >= key_first && key_first >= 0 && window >= 0, "prefill_attention: shapes disagree");
  TORCH_CHECK(slots.size(0) == first + T - key_first, "prefill_attention: one slot per key position key_first..first+T-1");
  TORCH_CHECK(window == 0 || first - key_first >= std::min<int64_t>(first, window - 1), "prefill_attention: keys start after the window");
  auto out = torch::empty_like(q);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t j = 0; j < slots.size(0); ++j) TORCH_CHECK(sp[j] >= 0 && sp[j] < keys.size(0), "prefill_attention: slot out of range");
  auto run = [&](auto d) {
    prefill_attention_d<decltype(d)::value>(q.data_ptr<BF16>(), keys.data_ptr<BF16>(), values.data_ptr<BF16>(), sp, slots.size(0), first, T,
                                            H, KVH, window, key_first, out.data_ptr<BF16>());
  };
  switch (D) {
    case 64: run(std::integral_constant<int64_t, 64>()); break;
    case 128: run(std::integral_constant<int64_t, 128>()); break;
    case 256: run(std::integral_constant<int64_t, 256>()); break;
    default: TORCH_CHECK(false, "prefill_attention: head_dim 64, 128 or 256");
  }
  return out;
}
#endif

// ---- one decoder layer of a decode step --------------------------------------------------------
//
// The ops above in DecoderLayer's order, in one call: norm, qkv, RoPE, (gated) decode attention
// writing the new keys/values, o_proj + residual, norm, gate_up, SwiGLU down + residual. Called op
// by op from Python, a decode step of a ~0.5B model spent about a quarter of its time between ~400
// native calls; here the results are the same, bit for bit.
torch::Tensor decode_layer(const torch::Tensor& h, const torch::Tensor& cos, const torch::Tensor& sin, double eps,
                           const torch::Tensor& input_norm, const torch::Tensor& qkv_w, const c10::optional<torch::Tensor>& qkv_scale,
                           const torch::Tensor& o_w, const c10::optional<torch::Tensor>& o_scale, const torch::Tensor& post_norm,
                           const torch::Tensor& gate_up_w, const c10::optional<torch::Tensor>& gate_up_scale, const torch::Tensor& down_w,
                           const c10::optional<torch::Tensor>& down_scale, bool packed, int64_t H, int64_t KVH, const torch::Tensor& rows,
                           const torch::Tensor& positions, const torch::Tensor& keys, const torch::Tensor& values, const torch::Tensor& table,
                           const c10::optional<torch::Tensor>& local_keys, const c10::optional<torch::Tensor>& local_values,
                           const c10::optional<torch::Tensor>& local_table, int64_t block_size, int64_t window,
                           const c10::optional<torch::Tensor>& gate_w, const c10::optional<torch::Tensor>& gate_b) {
  auto qkv = rope_qkv(linear(rms_norm(h, input_norm, eps), qkv_w, qkv_scale, c10::nullopt, false, packed), cos, sin, H, KVH);
  auto mixed = local_keys ? gated_decode_attention(qkv[0], rows, positions, keys, values, table, *local_keys, *local_values, *local_table,
                                                   block_size, window, *gate_w, *gate_b, qkv[1], qkv[2])
                          : decode_attention(qkv[0], rows, positions, keys, values, table, block_size, 0, qkv[1], qkv[2]);
  auto mid = linear(mixed.view({mixed.size(0), -1}), o_w, o_scale, h, false, packed);
  auto gate_up = linear(rms_norm(mid, post_norm, eps), gate_up_w, gate_up_scale, c10::nullopt, false, packed);
  return linear(gate_up, down_w, down_scale, mid, true, packed);
}

// ---- the peak of the batched kernel's multiply-add (a benchmark ceiling) -----------------------
//
// GFLOP/s of independent multiply-adds on registers, on PyTorch's number of threads, of the
// instruction that multiplies bf16 weights by several activation rows: vdpbf16ps (16 lanes x 2
// products) in an AVX-512 build, the fp32 FMA (8 lanes) in an AVX2 one. No batched decode can pass it.
constexpr int kChains = 12;  // more independent sums than latency x throughput on any AVX2/AVX-512 core
#ifdef LOOPCODER_WIDE
using Lanes = __m512;
constexpr int64_t kFlopsPerOp = 64;
inline Lanes multiply_add(Lanes acc) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(0x3f7f3f7f), (__m512bh)_mm512_set1_epi32(0x38d138d1));
}
inline Lanes splat(float v) { return _mm512_set1_ps(v); }
inline float lanes_sum(Lanes v) { return _mm512_reduce_add_ps(v); }
#else
using Lanes = __m256;
constexpr int64_t kFlopsPerOp = 16;
inline Lanes multiply_add(Lanes acc) { return _mm256_fmadd_ps(acc, _mm256_set1_ps(0.9999f), _mm256_set1_ps(1e-4f)); }
inline Lanes splat(float v) { return _mm256_set1_ps(v); }
inline float lanes_sum(Lanes v) { return hsum(v); }
#endif

// Not inlined: inlined into its caller, GCC 12 spilled every sum to the stack on each iteration.
__attribute__((noinline)) float multiply_add_chains(int64_t iterations) {
  Lanes acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = splat(0.001f * c);
  for (int64_t i = 0; i < iterations; ++i)
    for (int c = 0; c < kChains; ++c) acc[c] = multiply_add(acc[c]);
  float total = 0.0f;
  for (int c = 0; c < kChains; ++c) total += lanes_sum(acc[c]);
  return total;
}

double product_peak_gflops(int64_t iterations) {
  int64_t threads = at::get_num_threads();
  std::vector<float> sums(threads);
  auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> helpers;
  for (int64_t t = 1; t < threads; ++t) helpers.emplace_back([&, t] { sums[t] = multiply_add_chains(iterations); });
  sums[0] = multiply_add_chains(iterations);
  for (auto& h : helpers) h.join();
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  TORCH_CHECK(std::isfinite(std::accumulate(sums.begin(), sums.end(), 0.0f)), "product_peak_gflops: lost the sums");
  return threads * iterations * kChains * kFlopsPerOp / seconds / 1e9;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "residual + x . w^T (* scale), x optionally [gate | up] for SwiGLU", py::arg("x"), py::arg("w"),
        py::arg("scale") = py::none(), py::arg("residual") = py::none(), py::arg("swiglu") = false, py::arg("packed") = false);
  m.def("swiglu", &swiglu, "silu(gate) * up of rows [gate | up], each op rounded to the dtype as PyTorch rounds it");
  m.def("pack", &pack, "weight rows laid out for the linear kernel (groups of 8 rows in 16-wide chunks), optionally written into `into`",
        py::arg("w"), py::arg("into") = py::none());
  m.def("unpack", &unpack, "the plain [N, K] weight back from `pack`'s layout");
  m.def("packed_rows", &packed_rows, "rows ids of a packed weight, in the plain layout (an embedding lookup)");
  m.def("quantize_int8", &quantize_int8, "per-row symmetric int8: (q, scale) with w = scale[:, None] * q");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim");
  m.def("rope_qkv", &rope_qkv, "split fused qkv rows into q, k, v with RoPE applied to q and k");
  m.def("decode_attention", &decode_attention, "attention of one new token per sequence over a paged cache (window 0: all earlier keys), "
        "after writing k_new/v_new if given", py::arg("q"), py::arg("rows"), py::arg("positions"), py::arg("keys"), py::arg("values"),
        py::arg("table"), py::arg("block_size"), py::arg("window"), py::arg("k_new") = py::none(), py::arg("v_new") = py::none());
  m.def("gated_decode_attention", &gated_decode_attention, "a later loop's gated mix of global and window attention, one token per "
        "sequence, after writing k_new/v_new to the local cache if given", py::arg("q"), py::arg("rows"), py::arg("positions"),
        py::arg("keys"), py::arg("values"), py::arg("table"), py::arg("local_keys"), py::arg("local_values"), py::arg("local_table"),
        py::arg("block_size"), py::arg("window"), py::arg("gate_w"), py::arg("gate_b"), py::arg("k_new") = py::none(),
        py::arg("v_new") = py::none());
  m.def("gate_mix", &gate_mix, "a later loop's per-head gated mix g * global + (1 - g) * local of rows [N, H, D], "
        "g = sigmoid(q . gate_w + gate_b)");
  m.def("product_peak_gflops", &product_peak_gflops, "GFLOP/s of independent multiply-adds of the batched bf16 kernel's "
        "instruction (vdpbf16ps or fp32 FMA) on registers, on PyTorch's threads (a ceiling)");
  m.attr("wide") = kWide;
#ifdef LOOPCODER_WIDE
  m.def("prefill_attention", &prefill_attention, "causal attention of T new tokens at positions first.. over the keys/values at "
        "positions key_first..first+T-1 (cache rows `slots`), within `window` positions if > 0; bf16, head_dim 64/128/256",
        py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("slots"), py::arg("first"), py::arg("window") = 0,
        py::arg("key_first") = 0);
#endif
  m.def("decode_layer", &decode_layer, "one decoder layer of a decode step (one new token per sequence), in one call");
}
