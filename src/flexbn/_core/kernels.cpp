// flexbn's CPU kernels: the four passes of batch norm over a segmented batch, for float and double.
//
// Plain C entry points called through ctypes with raw pointers (no Python or torch headers). Built at
// install time by setup.py, once per x86-64 level (the loader picks the best one the processor supports),
// or at run time by flexbn/_core/native.py for this machine when none fits (both with _build.py's flags).
// Every entry point returns 0, -1 when a segment id is out of range, -2 when a work table cannot be
// allocated, -3 on any other C++ exception, -4 on invalid arguments; flexbn_last_error() says more. No
// exception crosses the C boundary, and none leaves an OpenMP region (see parallel()).
//
// Geometry shared by every kernel. The input is viewed either as
//   NCL: x[n][c][l] (contiguous tensors of rank >= 3), or
//   NLC: x[n][l][c] (channels_last tensors, and (N, C) with L = 1),
// with N samples, C channels, L positions per sample and channel. Sample n belongs to segment ids[n]
// (ids == nullptr: one segment, G = 1); mask[n * L + l] == 0 removes position l of sample n from every
// reduction (mask == nullptr: all kept). Per-(segment, channel) parameters are (G, C) row-major.
//
// Numerics: every reduction reads its input once. Moments are sums of deviations from a shift within a
// fraction of a standard deviation of the mean, merged in double with Chan's formulas (see moments
// below), so nothing is formed as E[x^2] - E[x]^2. Sums run in the input's precision over at most FLUSH
// values per vector lane, then in double. Threads split channels or rows in a fixed way and merge in a
// fixed order: results do not depend on timing, only on the thread count -- not on the instruction set
// either (sums keep a fixed number of lanes whatever the vector width; no fused multiply-adds).

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <vector>

namespace {

using i64 = std::int64_t;
using u8 = std::uint8_t;


struct Geo {
  i64 N, C, L;
  int layout;  // 0: NCL, 1: NLC
  const i64* ids;
  i64 G;
  const u8* mask;
  int threads;
};

bool ids_ok(const Geo& g) {
  if (!g.ids) return true;
  for (i64 n = 0; n < g.N; ++n)
    if (g.ids[n] < 0 || g.ids[n] >= g.G) return false;
  return true;
}

inline i64 seg_of(const Geo& g, i64 n) { return g.ids ? g.ids[n] : 0; }

// Chan's merge of (nb, mb, qb) into (na, ma, qa): counts, means, sums of squared deviations.
inline void merge(double na, double& ma, double& qa, double nb, double mb, double qb) {
  const double n = na + nb;
  if (nb == 0) return;
  const double d = mb - ma;
  ma += d * (nb / n);
  qa += qb + d * d * (na * nb / n);
}

// v where the mask byte is 1, else +0: a bitwise AND with a lane mask made from the byte. Masked-out
// values may be NaN or inf padding, so they are cleared, never multiplied by 0; and unlike a conditional
// (which GCC reduces lane by lane, in order), an AND keeps masked reductions vectorized.
template <class T>
struct Bits;
template <>
struct Bits<float> {
  using type = std::uint32_t;
};
template <>
struct Bits<double> {
  using type = std::uint64_t;
};

template <class T>
inline T keep_if(T v, u8 keep) {
  using U = typename Bits<T>::type;
  const U lanes = U(0) - static_cast<U>(keep);  // 0 or all ones (mask bytes are 0 or 1: see mask01)
  U u;
  std::memcpy(&u, &v, sizeof u);
  u &= lanes;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

int threads_for(i64 work, int threads) {
  return static_cast<int>(std::max<i64>(1, std::min<i64>(threads, work)));
}

// body(t, team) on an OpenMP team of up to `threads` threads; returns the team's size (it may be smaller
// than asked: OMP_THREAD_LIMIT, nesting). An exception cannot leave an OpenMP region (the process would
// terminate): the first one thrown by any thread (std::bad_alloc for a per-thread table) is rethrown
// here once the team has joined, and the entry points turn it into an error code. One thread: no region
// (entering one costs about a microsecond, a small call's whole work).
template <class Body>
int parallel(int threads, Body&& body) {
  if (threads <= 1) {
    body(0, 1);
    return 1;
  }
  std::exception_ptr error;
  int team = 1;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), size = omp_get_num_threads();
    if (t == 0) team = size;
    try {
      body(t, size);
    } catch (...) {
#pragma omp critical(flexbn_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
  return team;
}

// ---------------------------------------------------------------------------------------------------
// Moments: count[g], mean[g][c], m2[g][c] (sum of squared deviations from the mean).
//
// One pass. Each (segment, channel) keeps a shift K close to its mean: the mean of its first few kept
// values, then its running mean. A run of values (a row of L values, or a block of rows) is reduced to
// sums of d = x - K and d^2 -- in the input's precision over at most FLUSH values per vector lane, then in
// double -- and merged into the running statistics with Chan's formulas: since K is within a fraction of a
// standard deviation of the mean, s2 - s1^2 / k loses nothing to cancellation, however large the mean.

constexpr i64 FLUSH = 128;  // values summed in the input's precision before joining a double
constexpr i64 BLOCK_ROWS = 64;  // rows of an NLC run
constexpr i64 PROBE = 32;  // kept values whose mean is the first shift

constexpr i64 LANES = 64;  // bytes of independent accumulators in a masked reduction (a vector)

template <class T>
inline void shifted_sums(const T* v, const u8* m, i64 len, T K, double& s1, double& s2) {
  // Explicit lanes, masked or not: a fixed summation order whatever the vector width (the libraries
  // built for each x86-64 level give identical results), and GCC reduces a masked sum in order
  // otherwise, one value at a time.
  constexpr int W = LANES / sizeof(T);
  for (i64 l0 = 0; l0 < len; l0 += FLUSH) {
    const i64 e = std::min(len, l0 + FLUSH);
    T p1[W] = {}, p2[W] = {};
    i64 l = l0;
    if (m) {
      for (; l + W <= e; l += W) {
#pragma omp simd
        for (int j = 0; j < W; ++j) {
          const T d = keep_if(v[l + j] - K, m[l + j]);
          p1[j] += d;
          p2[j] += d * d;
        }
      }
    } else {
      for (; l + W <= e; l += W) {
#pragma omp simd
        for (int j = 0; j < W; ++j) {
          const T d = v[l + j] - K;
          p1[j] += d;
          p2[j] += d * d;
        }
      }
    }
    T a1 = 0, a2 = 0;
    for (int j = 0; j < W; ++j) {
      a1 += p1[j];
      a2 += p2[j];
    }
    for (; l < e; ++l) {
      const T d = m ? keep_if(v[l] - K, m[l]) : v[l] - K;
      a1 += d;
      a2 += d * d;
    }
    s1 += a1;
    s2 += a2;
  }
}

// The mean of the first PROBE kept values of a row (the row has at least one).
template <class T>
inline T probe(const T* v, const u8* m, i64 len) {
  double sum = 0;
  i64 k = 0;
  for (i64 l = 0; l < len && k < PROBE; ++l)
    if (!m || m[l]) {
      sum += static_cast<double>(v[l]);
      ++k;
    }
  return static_cast<T>(sum / static_cast<double>(k));
}

// Merge a run (k values, sums s1, s2 of d = x - K) into the statistics (n, mean, m2), given
// inv_k = 1 / k and f = k / (n + k) (shared by every channel of the run: no division here).
inline void merge_run(double n, double& mean, double& m2, double inv_k, double f, double K, double s1,
                      double s2) {
  const double run_mean = K + s1 * inv_k;
  double run_m2 = s2 - s1 * s1 * inv_k;
  if (run_m2 < 0) run_m2 = 0;  // rounding; not std::max, which would turn a NaN (inf input) into 0
  if (n == 0) {
    mean = run_mean;
    m2 = run_m2;
  } else {
    const double d = run_mean - mean;
    mean += d * f;
    m2 += run_m2 + d * d * n * f;
  }
}

std::vector<double> kept_per_sample(const Geo& g) {
  std::vector<double> kept(g.N, static_cast<double>(g.L));
  if (g.mask)
    for (i64 n = 0; n < g.N; ++n) {
      i64 k = 0;
      const u8* m = g.mask + n * g.L;
      for (i64 l = 0; l < g.L; ++l) k += m[l] != 0;
      kept[n] = static_cast<double>(k);
    }
  return kept;
}

// NCL: each thread takes a slice of channels and walks the samples in memory order.
template <class T>
void moments_ncl(const T* x, const Geo& g, double* count, double* mean, double* m2) {
  const i64 N = g.N, C = g.C, L = g.L, G = g.G;
  const std::vector<double> kept = kept_per_sample(g);
  std::vector<T> shift(G * C);
  std::fill(count, count + G, 0.0);
  for (i64 n = 0; n < N; ++n) count[seg_of(g, n)] += kept[n];
  parallel(threads_for(C, g.threads), [&](int t, int T_) {
    const i64 c0 = C * t / T_, c1 = C * (t + 1) / T_;
    std::vector<double> seen(G, 0.0);
    for (i64 n = 0; n < N; ++n) {
      const double k = kept[n];
      if (k == 0) continue;
      const i64 s = seg_of(g, n);
      const u8* m = g.mask ? g.mask + n * L : nullptr;
      const double inv_k = 1.0 / k, f = k / (seen[s] + k);
      for (i64 c = c0; c < c1; ++c) {
        const i64 o = s * C + c;
        const T* v = x + (n * C + c) * L;
        if (seen[s] == 0) shift[o] = probe(v, m, L);
        double s1 = 0, s2 = 0;
        shifted_sums(v, m, L, shift[o], s1, s2);
        merge_run(seen[s], mean[o], m2[o], inv_k, f, static_cast<double>(shift[o]), s1, s2);
        shift[o] = static_cast<T>(mean[o]);
      }
      seen[s] += k;
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// NLC reductions (channels_last and (N, C) input): rows r = n * L + l of C contiguous values.
//
// One walker serves the statistics and the backward sums. It takes rows [r0, r1) in memory order, in
// groups of up to GROUP consecutive rows of one segment (masked-out rows stay in a group and are cleared
// there), and hands each group to an accumulation policy, which adds it to that segment's partial sums in
// the input's precision, R rows per visit of the partial sums (group_rows). A segment's partial sums are
// flushed into its double-precision results after BLOCK_ROWS rows. Partial sums are kept for every
// segment at once while they fit in SCATTER_BYTES; beyond (many segments), one segment's at a time,
// flushed when the segment changes.

constexpr i64 SCATTER_BYTES = i64(1) << 20;
constexpr int GROUP = 16;  // rows of one segment handed to the policy at a time

// Rows added per visit of the partial sums, by the bytes of a row (of the channels read). A visit reads
// its R rows channel-vector by channel-vector, so the R rows should span about 1 KiB: narrower rows cost
// more per row than their values (16 rows of 64 bytes, 8 of 128, 4 up to ROW_BY_ROW_BYTES); wider ones
// are read one by one, in memory order (R rows of 512 bytes read across ran at half the speed of a plain
// stream: the hardware prefetchers follow one stream, not R interleaved ones); rows of WIDE_ROW_BYTES or
// more, WIDE_GROUP at a time (their per-row overhead is small, and 16 of them, twice for the backward's
// two inputs, map to the same L1 sets and evict each other).
constexpr i64 ROW_BY_ROW_BYTES = 512;
constexpr i64 WIDE_ROW_BYTES = 2048;
constexpr int WIDE_GROUP = 4;

inline int group_rows(i64 row_bytes) {
  if (row_bytes >= WIDE_ROW_BYTES) return WIDE_GROUP;
  if (row_bytes >= ROW_BY_ROW_BYTES) return 1;
  return row_bytes <= 64 ? 16 : (row_bytes <= 128 ? 8 : 4);
}

// The first row after sample n's start whose segment differs from s (sample n's), at most `limit`.
inline i64 segment_end(const Geo& g, i64 n, i64 s, i64 limit) {
  if (!g.ids) return limit;
  i64 e = std::min(limit, (n + 1) * g.L);
  while (e < limit && g.ids[e / g.L] == s) e = std::min(limit, (e / g.L + 1) * g.L);
  return e;
}

template <class Policy>
void walk_rows(const Geo& g, i64 r0, i64 r1, i64 w, i64 bytes_per_value, Policy& acc) {
  const i64 G = g.G;
  const bool scatter = !g.ids || 2 * G * w * bytes_per_value <= SCATTER_BYTES;
  const i64 slots = scatter ? G : 1;
  acc.reserve(slots);
  std::vector<i64> rows_in(slots, 0), owner(slots, -1), touched;
  for (i64 r = r0; r < r1;) {
    const i64 n = g.ids ? r / g.L : 0, s = seg_of(g, n), sl = scatter ? s : 0;
    if (owner[sl] != s) {
      if (owner[sl] >= 0 && rows_in[sl] > 0) acc.flush(sl, owner[sl]);
      if (owner[sl] < 0) touched.push_back(sl);
      rows_in[sl] = 0;
      owner[sl] = s;
      acc.begin(sl, s);
    }
    const i64 room = std::min<i64>(GROUP, BLOCK_ROWS - rows_in[sl]);
    const i64 k = segment_end(g, n, s, std::min(r1, r + room)) - r;
    acc.add(sl, s, r, static_cast<int>(k), g.mask ? g.mask + r : nullptr);
    rows_in[sl] += k;
    r += k;
    if (rows_in[sl] >= BLOCK_ROWS) {
      acc.flush(sl, s);
      rows_in[sl] = 0;
    }
  }
  for (const i64 sl : touched)
    if (rows_in[sl] > 0) acc.flush(sl, owner[sl]);
}

// R consecutive rows (stride C) added to the partial sums of deviations from K.
template <int R, class T>
inline void shifted_group(const T* v, i64 C, i64 w, const T* K, T* a1, T* a2) {
#pragma omp simd
  for (i64 c = 0; c < w; ++c) {
    T s1 = 0, s2 = 0;
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const T d = v[i * C + c] - K[c];
      s1 += d;
      s2 += d * d;
    }
    a1[c] += s1;
    a2[c] += s2;
  }
}

// The same with masked-out rows (keep bytes 0) cleared.
template <int R, class T>
inline void shifted_group_masked(const T* v, i64 C, i64 w, const T* K, const u8* keep, T* a1, T* a2) {
  u8 kp[R];
  for (int i = 0; i < R; ++i) kp[i] = keep[i];
#pragma omp simd
  for (i64 c = 0; c < w; ++c) {
    T s1 = 0, s2 = 0;
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const T d = keep_if(v[i * C + c] - K[c], kp[i]);
      s1 += d;
      s2 += d * d;
    }
    a1[c] += s1;
    a2[c] += s2;
  }
}

// R consecutive rows of dy and x added to the backward's partial sums.
template <int R, class T>
inline void grad_group(const T* gv, const T* xv, i64 C, i64 w, const T* sh, T* p, T* q) {
#pragma omp simd
  for (i64 c = 0; c < w; ++c) {
    T sp = 0, sq = 0;
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const T gg = gv[i * C + c];
      sp += gg;
      sq += gg * (xv[i * C + c] - sh[c]);
    }
    p[c] += sp;
    q[c] += sq;
  }
}

// The same with masked-out rows (keep bytes 0) cleared.
template <int R, class T>
inline void grad_group_masked(const T* gv, const T* xv, i64 C, i64 w, const T* sh, const u8* keep,
                              T* p, T* q) {
  u8 kp[R];
  for (int i = 0; i < R; ++i) kp[i] = keep[i];
#pragma omp simd
  for (i64 c = 0; c < w; ++c) {
    T sp = 0, sq = 0;
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const T gg = gv[i * C + c];
      sp += keep_if(gg, kp[i]);
      sq += keep_if(gg * (xv[i * C + c] - sh[c]), kp[i]);
    }
    p[c] += sp;
    q[c] += sq;
  }
}

// k consecutive rows added to the statistics' partial sums, R at a time (group_rows), the rest (and
// all of them when R is 1) one by one; masked-out rows cleared or skipped.
template <int R, class T>
inline int shifted_rows(const T* v, i64 C, i64 w, const T* K, const u8* m, int k, T* a1, T* a2) {
  int i = 0;
  if (m)
    for (; i + R <= k; i += R) shifted_group_masked<R>(v + i * C, C, w, K, m + i, a1, a2);
  else
    for (; i + R <= k; i += R) shifted_group<R>(v + i * C, C, w, K, a1, a2);
  return i;
}

template <class T>
inline void add_shifted(const T* v, i64 C, i64 w, const T* K, const u8* m, int k, int R, T* a1,
                        T* a2) {
  int i = 0;
  if (R == 16)
    i = shifted_rows<16>(v, C, w, K, m, k, a1, a2);
  else if (R == 8)
    i = shifted_rows<8>(v, C, w, K, m, k, a1, a2);
  else if (R == 4)
    i = shifted_rows<4>(v, C, w, K, m, k, a1, a2);
  for (; i < k; ++i) {
    if (m && !m[i]) continue;
    const T* vi = v + i * C;
#pragma omp simd
    for (i64 c = 0; c < w; ++c) {
      const T d = vi[c] - K[c];
      a1[c] += d;
      a2[c] += d * d;
    }
  }
}

// The same for the backward's sums of dy and dy * (x - shift).
template <int R, class T>
inline int grad_rows(const T* gv, const T* xv, i64 C, i64 w, const T* sh, const u8* m, int k, T* p,
                     T* q) {
  int i = 0;
  if (m)
    for (; i + R <= k; i += R) grad_group_masked<R>(gv + i * C, xv + i * C, C, w, sh, m + i, p, q);
  else
    for (; i + R <= k; i += R) grad_group<R>(gv + i * C, xv + i * C, C, w, sh, p, q);
  return i;
}

template <class T>
inline void add_grad(const T* gv, const T* xv, i64 C, i64 w, const T* sh, const u8* m, int k, int R,
                     T* p, T* q) {
  int i = 0;
  if (R == 16)
    i = grad_rows<16>(gv, xv, C, w, sh, m, k, p, q);
  else if (R == 8)
    i = grad_rows<8>(gv, xv, C, w, sh, m, k, p, q);
  else if (R == 4)
    i = grad_rows<4>(gv, xv, C, w, sh, m, k, p, q);
  for (; i < k; ++i) {
    if (m && !m[i]) continue;
    const T *gi = gv + i * C, *xi = xv + i * C;
#pragma omp simd
    for (i64 c = 0; c < w; ++c) {
      p[c] += gi[c];
      q[c] += gi[c] * (xi[c] - sh[c]);
    }
  }
}

// The statistics: per slot, sums of deviations from the segment's shift K (shift + s * C + c0), merged
// with Chan's formulas into seen[s] (this thread's counts), mean and m2 (row stride C).
template <class T>
struct MomentsPolicy {
  const T* x;
  const Geo& g;
  i64 c0, w;
  double *seen, *mean, *m2;
  T* shift;
  bool run_mode = false;  // one slot for one segment at a time (many segments)
  std::vector<T> a1, a2;
  std::vector<double> kept;
  std::vector<char> fresh;  // run mode: the segment's first shift still to be taken
  const int R;  // rows per visit of the partial sums

  MomentsPolicy(const T* x_, const Geo& g_, i64 c0_, i64 w_, double* seen_, double* mean_, double* m2_,
                T* shift_)
      : x(x_), g(g_), c0(c0_), w(w_), seen(seen_), mean(mean_), m2(m2_), shift(shift_),
        R(group_rows(w_ * static_cast<i64>(sizeof(T)))) {}

  void reserve(i64 slots) {
    a1.assign(slots * w, T(0));
    a2.assign(slots * w, T(0));
    kept.assign(slots, 0.0);
    fresh.assign(slots, 0);
    run_mode = g.ids && slots == 1 && g.G > 1;
  }
  void begin(i64 sl, i64 s) { fresh[sl] = run_mode && seen[s] == 0; }
  void add(i64 sl, i64 s, i64 r, int k, const u8* m) {
    const i64 C = g.C;
    const T* v = x + r * C + c0;
    T* K = shift + s * C + c0;
    double k_kept = k;
    if (m) {
      k_kept = 0;
      for (int i = 0; i < k; ++i) k_kept += m[i];
    }
    if (k_kept == 0) return;
    if (fresh[sl]) {  // a run's first shift: its first kept row
      int i = 0;
      while (m && !m[i]) ++i;
      std::copy(v + i * C, v + i * C + w, K);
      fresh[sl] = 0;
    }
    T *p1 = a1.data() + sl * w, *p2 = a2.data() + sl * w;
    if (k == GROUP && R == GROUP && !m)
      shifted_group<GROUP>(v, C, w, K, p1, p2);
    else
      add_shifted(v, C, w, K, m, k, R, p1, p2);
    kept[sl] += k_kept;
  }
  void flush(i64 sl, i64 s) {
    if (kept[sl] == 0) return;
    const i64 C = g.C;
    const double k = kept[sl], inv_k = 1.0 / k, f = k / (seen[s] + k), n = seen[s];
    T *p1 = a1.data() + sl * w, *p2 = a2.data() + sl * w, *K = shift + s * C + c0;
    double* mo = mean + s * C + c0;
    double* qo = m2 + s * C + c0;
#pragma omp simd
    for (i64 c = 0; c < w; ++c) {
      merge_run(n, mo[c], qo[c], inv_k, f, static_cast<double>(K[c]), p1[c], p2[c]);
      K[c] = static_cast<T>(mo[c]);
      p1[c] = p2[c] = T(0);
    }
    seen[s] += k;
    kept[sl] = 0;
  }
};

// Rows [r0, r1) and channels [c0, c1) of the statistics (see MomentsPolicy). Segments whose partial sums
// fit together start from the mean of their first (up to) four kept rows; in run mode, from their first
// kept row.
template <class T>
void moments_nlc_part(const T* x, const Geo& g, i64 r0, i64 r1, i64 c0, i64 c1, double* seen,
                      double* mean, double* m2, T* shift) {
  const i64 C = g.C, w = c1 - c0, G = g.G;
  if (!g.ids || 2 * G * w * static_cast<i64>(sizeof(T)) <= SCATTER_BYTES) {
    std::vector<double> sum(G * w, 0.0);
    std::vector<int> probes(G, 0);
    i64 pending = 0;
    for (i64 s = 0; s < G; ++s) pending += seen[s] == 0;
    i64 n = r0 / g.L, l = r0 % g.L;  // the sample of row r, without a division per row
    for (i64 r = r0; r < r1 && pending > 0; ++r, l = (l + 1 == g.L) ? (++n, 0) : l + 1) {
      if (g.mask && !g.mask[r]) continue;
      const i64 s = seg_of(g, n);
      if (seen[s] != 0 || probes[s] == 4) continue;
      const T* v = x + r * C + c0;
      for (i64 c = 0; c < w; ++c) sum[s * w + c] += static_cast<double>(v[c]);
      if (++probes[s] == 4) --pending;
    }
    for (i64 s = 0; s < G; ++s)
      if (probes[s] > 0)
        for (i64 c = 0; c < w; ++c) shift[s * C + c0 + c] = static_cast<T>(sum[s * w + c] / probes[s]);
  }
  MomentsPolicy<T> acc(x, g, c0, w, seen, mean, m2, shift);
  walk_rows(g, r0, r1, w, static_cast<i64>(sizeof(T)), acc);
}

// Per-thread tables of this many values at most; beyond, threads split channels instead of rows.
constexpr i64 PRIVATE_LIMIT = i64(1) << 20;

template <class T>
void moments_nlc(const T* x, const Geo& g, double* count, double* mean, double* m2) {
  const i64 R = g.N * g.L, C = g.C, G = g.G;
  const int nt = threads_for(R / BLOCK_ROWS + 1, g.threads);
  if (nt == 1 || G * C > PRIVATE_LIMIT) {
    // Channel slices of at least 16 values (a cache line of floats) per thread.
    const int ct = threads_for((C + 15) / 16, g.threads);
    std::vector<T> shift(G * C);
    parallel(ct, [&](int t, int T_) {
      const i64 c0 = C * t / T_, c1 = C * (t + 1) / T_;
      std::vector<double> seen(G, 0.0);
      if (c1 > c0) moments_nlc_part(x, g, 0, R, c0, c1, seen.data(), mean, m2, shift.data());
      if (t == 0)
        for (i64 s = 0; s < G; ++s) count[s] = seen[s];
    });
    return;
  }
  // The team may be smaller than asked (OMP_THREAD_LIMIT, nesting): ranges and the merge follow the team.
  std::vector<std::vector<double>> seen(nt), mo(nt), qo(nt);
  const int team = parallel(nt, [&](int t, int T_) {
    const i64 r0 = R * t / T_, r1 = R * (t + 1) / T_;
    seen[t].assign(G, 0.0);
    mo[t].assign(G * C, 0.0);
    qo[t].assign(G * C, 0.0);
    std::vector<T> shift(G * C);
    moments_nlc_part(x, g, r0, r1, 0, C, seen[t].data(), mo[t].data(), qo[t].data(), shift.data());
  });
  for (i64 s = 0; s < G; ++s) {
    double n = 0;
    for (int t = 0; t < team; ++t) {
      const double k = seen[t][s];
      if (k == 0) continue;
      for (i64 c = 0; c < C; ++c) {
        const i64 o = s * C + c;
        if (n == 0) {
          mean[o] = mo[t][o];
          m2[o] = qo[t][o];
        } else {
          merge(n, mean[o], m2[o], k, mo[t][o], qo[t][o]);
        }
      }
      n += k;
    }
    count[s] = n;
  }
}

template <class T>
void moments(const T* x, const Geo& g, double* count, double* mean, double* m2) {
  std::fill(mean, mean + g.G * g.C, 0.0);
  std::fill(m2, m2 + g.G * g.C, 0.0);
  if (g.layout == 0)
    moments_ncl(x, g, count, mean, m2);
  else
    moments_nlc(x, g, count, mean, m2);
}

// ---------------------------------------------------------------------------------------------------
// Elementwise: out = a * u + keep * (b * (v - s) + d), every coefficient per (segment, channel), each
// of a/u and b/v/s/d optional (nullptr: the term is absent). keep is the mask (1 without one). Normalize
// is ((x - shift) - delta) * scale + bias: u = nullptr, and the kernel below.

template <class T>
void normalize(const T* x, T* y, const Geo& g, const T* shift, const T* delta, const T* scale,
               const T* bias) {
  const i64 C = g.C, L = g.L;
  if (g.layout == 0) {
    const i64 rows = g.N * C;
#pragma omp parallel for schedule(static) num_threads(threads_for(rows, g.threads)) \
    if (g.threads > 1)
    for (i64 row = 0; row < rows; ++row) {
      const i64 n = row / C, c = row % C, o = seg_of(g, n) * C + c;
      const T sh = shift[o], de = delta ? delta[o] : T(0), sc = scale[o], bi = bias ? bias[o] : T(0);
      const T* v = x + row * L;
      T* out = y + row * L;
#pragma omp simd
      for (i64 l = 0; l < L; ++l) out[l] = ((v[l] - sh) - de) * sc + bi;
    }
  } else {
    const i64 rows = g.N * L;
#pragma omp parallel for schedule(static) num_threads(threads_for(rows / 8 + 1, g.threads)) \
    if (g.threads > 1)
    for (i64 r = 0; r < rows; ++r) {
      const i64 o = g.ids ? g.ids[r / L] * C : 0;
      const T *sh = shift + o, *sc = scale + o;
      const T* v = x + r * C;
      T* out = y + r * C;
      if (delta && bias) {
        const T *de = delta + o, *bi = bias + o;
#pragma omp simd
        for (i64 c = 0; c < C; ++c) out[c] = ((v[c] - sh[c]) - de[c]) * sc[c] + bi[c];
      } else if (bias) {
        const T* bi = bias + o;
#pragma omp simd
        for (i64 c = 0; c < C; ++c) out[c] = (v[c] - sh[c]) * sc[c] + bi[c];
      } else if (delta) {
        const T* de = delta + o;
#pragma omp simd
        for (i64 c = 0; c < C; ++c) out[c] = ((v[c] - sh[c]) - de[c]) * sc[c];
      } else {
#pragma omp simd
        for (i64 c = 0; c < C; ++c) out[c] = (v[c] - sh[c]) * sc[c];
      }
    }
  }
}

template <class T>
inline T affine_term(const T* a, const T* u, const T* b, const T* v, const T* s, const T* d, bool keep,
                     i64 i, i64 o) {
  T out = a ? a[o] * u[i] : T(0);
  if (keep) {
    T t = b ? b[o] * (v[i] - s[o]) : T(0);
    if (d) t += d[o];
    out += t;
  }
  return out;
}

template <class T>
void apply(const T* a, const T* u, const T* b, const T* v, const T* s, const T* d, T* out,
           const Geo& g) {
  const i64 C = g.C, L = g.L;
  if (g.layout == 0) {
    const i64 rows = g.N * C;
#pragma omp parallel for schedule(static) num_threads(threads_for(rows, g.threads)) \
    if (g.threads > 1)
    for (i64 row = 0; row < rows; ++row) {
      const i64 n = row / C, c = row % C, o = seg_of(g, n) * C + c, base = row * L;
      const T A = a ? a[o] : T(0), B = b ? b[o] : T(0), S = s ? s[o] : T(0), D = d ? d[o] : T(0);
      const T* uu = u ? u + base : nullptr;
      const T* vv = v ? v + base : nullptr;
      T* w = out + base;
      const u8* m = g.mask ? g.mask + n * L : nullptr;
      if (!m) {
        if (uu && vv) {
#pragma omp simd
          for (i64 l = 0; l < L; ++l) w[l] = A * uu[l] + (B * (vv[l] - S) + D);
        } else if (uu) {
#pragma omp simd
          for (i64 l = 0; l < L; ++l) w[l] = A * uu[l] + D;
        } else if (vv) {
#pragma omp simd
          for (i64 l = 0; l < L; ++l) w[l] = B * (vv[l] - S) + D;
        } else {
          for (i64 l = 0; l < L; ++l) w[l] = D;
        }
      } else if (uu && vv) {
#pragma omp simd
        for (i64 l = 0; l < L; ++l) {
          const T first = A * uu[l], second = B * (vv[l] - S) + D;
          w[l] = first + keep_if(second, m[l]);
        }
      } else if (uu) {
#pragma omp simd
        for (i64 l = 0; l < L; ++l) {
          const T first = A * uu[l];
          w[l] = first + keep_if(D, m[l]);
        }
      } else if (vv) {
#pragma omp simd
        for (i64 l = 0; l < L; ++l) {
          const T second = B * (vv[l] - S) + D;
          w[l] = keep_if(second, m[l]);
        }
      } else {
        for (i64 l = 0; l < L; ++l) w[l] = keep_if(D, m[l]);
      }
    }
  } else {
    const i64 rows = g.N * L;
#pragma omp parallel for schedule(static) num_threads(threads_for(rows / 8 + 1, g.threads)) \
    if (g.threads > 1)
    for (i64 r = 0; r < rows; ++r) {
      const i64 o = g.ids ? g.ids[r / L] * C : 0, base = r * C;
      const bool keep = !g.mask || g.mask[r];
      const T *A = a ? a + o : nullptr, *B = b ? b + o : nullptr, *S = s ? s + o : nullptr,
              *D = d ? d + o : nullptr;
      const T* uu = u ? u + base : nullptr;
      const T* vv = v ? v + base : nullptr;
      T* w = out + base;
      if (keep && A && B && D && uu && vv) {
#pragma omp simd
        for (i64 c = 0; c < C; ++c) w[c] = A[c] * uu[c] + (B[c] * (vv[c] - S[c]) + D[c]);
      } else if (keep && A && uu && !B && D) {
#pragma omp simd
        for (i64 c = 0; c < C; ++c) w[c] = A[c] * uu[c] + D[c];
      } else if (A && uu && (!keep || (!B && !D))) {
#pragma omp simd
        for (i64 c = 0; c < C; ++c) w[c] = A[c] * uu[c];
      } else if (!A && B && D && vv) {  // the statistics' gradient alone (stats_input)
        if (keep) {
#pragma omp simd
          for (i64 c = 0; c < C; ++c) w[c] = B[c] * (vv[c] - S[c]) + D[c];
        } else {
          std::fill(w, w + C, T(0));
        }
      } else {
        for (i64 c = 0; c < C; ++c) w[c] = affine_term(A, uu, B, vv, S, D, keep, c, c);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward sums over each segment's kept elements: sum_g[g][c] = sum(dy), sum_gx[g][c] = sum(dy * (x -
// shift[g][c])): in the input's precision over at most FLUSH values per vector lane, then in double.

template <class T>
inline void grad_sums(const T* gv, const T* xv, const u8* m, i64 len, T sh, double& a, double& b) {
  constexpr int W = LANES / sizeof(T);  // explicit lanes, as in shifted_sums
  for (i64 l0 = 0; l0 < len; l0 += FLUSH) {
    const i64 e = std::min(len, l0 + FLUSH);
    T pw[W] = {}, qw[W] = {};
    i64 l = l0;
    if (m) {
      for (; l + W <= e; l += W) {
#pragma omp simd
        for (int j = 0; j < W; ++j) {
          const T gg = gv[l + j];
          pw[j] += keep_if(gg, m[l + j]);
          qw[j] += keep_if(gg * (xv[l + j] - sh), m[l + j]);
        }
      }
    } else {
      for (; l + W <= e; l += W) {
#pragma omp simd
        for (int j = 0; j < W; ++j) {
          const T gg = gv[l + j];
          pw[j] += gg;
          qw[j] += gg * (xv[l + j] - sh);
        }
      }
    }
    T p = 0, q = 0;
    for (int j = 0; j < W; ++j) {
      p += pw[j];
      q += qw[j];
    }
    for (; l < e; ++l) {
      p += m ? keep_if(gv[l], m[l]) : gv[l];
      q += m ? keep_if(gv[l] * (xv[l] - sh), m[l]) : gv[l] * (xv[l] - sh);
    }
    a += p;
    b += q;
  }
}

// The backward sums: per slot, sums of dy and dy * (x - shift) added to sg and sgx (row stride C).
template <class T>
struct SumsPolicy {
  const T *dy, *x, *shift;
  const Geo& g;
  i64 c0, w;
  double *sg, *sgx;
  std::vector<T> pp, pq;
  std::vector<char> used;
  const int R;  // rows per visit of the partial sums

  SumsPolicy(const T* dy_, const T* x_, const T* shift_, const Geo& g_, i64 c0_, i64 w_, double* sg_,
             double* sgx_)
      : dy(dy_), x(x_), shift(shift_), g(g_), c0(c0_), w(w_), sg(sg_), sgx(sgx_),
        R(group_rows(w_ * static_cast<i64>(sizeof(T)))) {}

  void reserve(i64 slots) {
    pp.assign(slots * w, T(0));
    pq.assign(slots * w, T(0));
    used.assign(slots, 0);
  }
  void begin(i64, i64) {}
  void add(i64 sl, i64 s, i64 r, int k, const u8* m) {
    const i64 C = g.C;
    const T *gv = dy + r * C + c0, *xv = x + r * C + c0, *sh = shift + s * C + c0;
    T *p = pp.data() + sl * w, *q = pq.data() + sl * w;
    if (k == GROUP && R == GROUP && !m)
      grad_group<GROUP>(gv, xv, C, w, sh, p, q);
    else
      add_grad(gv, xv, C, w, sh, m, k, R, p, q);
    used[sl] = 1;
  }
  void flush(i64 sl, i64 s) {
    if (!used[sl]) return;
    const i64 o = s * g.C + c0;
    T *p = pp.data() + sl * w, *q = pq.data() + sl * w;
    for (i64 c = 0; c < w; ++c) {
      sg[o + c] += p[c];
      sgx[o + c] += q[c];
      p[c] = q[c] = T(0);
    }
    used[sl] = 0;
  }
};

template <class T>
void sums_nlc_part(const T* dy, const T* x, const T* shift, const Geo& g, i64 r0, i64 r1, i64 c0,
                   i64 c1, double* sg, double* sgx) {
  SumsPolicy<T> acc(dy, x, shift, g, c0, c1 - c0, sg, sgx);
  walk_rows(g, r0, r1, c1 - c0, static_cast<i64>(sizeof(T)), acc);
}

template <class T>
void sums(const T* dy, const T* x, const T* shift, const Geo& g, double* sg, double* sgx) {
  const i64 N = g.N, C = g.C, L = g.L, G = g.G;
  std::fill(sg, sg + G * C, 0.0);
  std::fill(sgx, sgx + G * C, 0.0);
  if (g.layout == 0) {
    parallel(threads_for(C, g.threads), [&](int t, int T_) {
      const i64 c0 = C * t / T_, c1 = C * (t + 1) / T_;
      for (i64 n = 0; n < N; ++n) {
        const u8* m = g.mask ? g.mask + n * L : nullptr;
        for (i64 c = c0; c < c1; ++c) {
          const i64 o = seg_of(g, n) * C + c, base = (n * C + c) * L;
          grad_sums(dy + base, x + base, m, L, shift[o], sg[o], sgx[o]);
        }
      }
    });
    return;
  }
  const i64 R = N * L;
  const int nt = threads_for(R / BLOCK_ROWS + 1, g.threads);
  if (nt == 1 || G * C > PRIVATE_LIMIT) {
    const int ct = threads_for((C + 15) / 16, g.threads);
    parallel(ct, [&](int t, int T_) {
      const i64 c0 = C * t / T_, c1 = C * (t + 1) / T_;
      if (c1 > c0) sums_nlc_part(dy, x, shift, g, 0, R, c0, c1, sg, sgx);
    });
    return;
  }
  std::vector<std::vector<double>> pa(nt), pb(nt);
  const int team = parallel(nt, [&](int t, int T_) {  // as in moments_nlc: the team may be smaller
    pa[t].assign(G * C, 0.0);
    pb[t].assign(G * C, 0.0);
    sums_nlc_part(dy, x, shift, g, R * t / T_, R * (t + 1) / T_, 0, C, pa[t].data(), pb[t].data());
  });
  for (int t = 0; t < team; ++t)
    for (i64 o = 0; o < G * C; ++o) {
      sg[o] += pa[t][o];
      sgx[o] += pb[t][o];
    }
}

Geo geo(i64 N, i64 C, i64 L, int layout, const i64* ids, i64 G, const u8* mask, int threads) {
  return Geo{N, C, L, layout, ids, ids ? G : 1, mask, std::max(1, threads)};
}

// The entry points' results (flexbn/_core/native.py turns them into Python exceptions).
constexpr int OK = 0, BAD_IDS = -1, NO_MEMORY = -2, FAILED = -3, BAD_ARGS = -4;

thread_local char last_error[256];

// The kernels read mask bytes as 0 or 1 (keep_if makes lanes by negation). A bool tensor viewed from other
// bytes may hold 2, 255, ... for true: such a mask is read once into a 0/1 copy. One pass over N * L
// bytes (the input has C times as many values); masks of 0/1 bytes are used as they are.
const u8* mask01(const u8* mask, i64 n, std::vector<u8>& copy) {
  if (!mask) return mask;
  u8 bits = 0;
  for (i64 i = 0; i < n; ++i) bits |= mask[i];
  if ((bits & ~u8(1)) == 0) return mask;
  copy.resize(n);
  for (i64 i = 0; i < n; ++i) copy[i] = mask[i] != 0;
  return copy.data();
}  // what went wrong in this thread's last call that failed

void set_error(const char* what) noexcept { std::snprintf(last_error, sizeof last_error, "%s", what); }

// Runs one kernel behind the C boundary: what the C side can check is checked here (required pointers,
// sizes, segment ids; native.py checks the rest -- dtypes, lengths, contiguity -- before calling), and
// no C++ exception crosses extern "C": each becomes an error code, with its message in last_error. Masks
// are read as booleans whatever their bytes.
template <class Kernel>
int guarded(const Geo& g, bool pointers_ok, Kernel&& kernel) noexcept {
  if (!pointers_ok || g.N < 0 || g.C < 0 || g.L < 0 || g.G < 1 || (g.layout != 0 && g.layout != 1)) {
    set_error("invalid arguments: a required pointer is null, a size negative or the layout unknown");
    return BAD_ARGS;
  }
  try {
    if (!ids_ok(g)) {
      set_error("segment ids must lie in [0, number of segments)");
      return BAD_IDS;
    }
    std::vector<u8> copy;
    Geo read = g;
    read.mask = mask01(g.mask, g.N * g.L, copy);
    kernel(static_cast<const Geo&>(read));
    return OK;
  } catch (const std::bad_alloc&) {
    set_error("out of memory for the kernels' work tables");
    return NO_MEMORY;
  } catch (const std::exception& e) {
    set_error(e.what());
    return FAILED;
  } catch (...) {
    set_error("unknown C++ exception");
    return FAILED;
  }
}

// ---------------------------------------------------------------------------------------------------
// The operations on the statistics currency: per (segment, channel) the count of kept elements, the
// mean and m2 (sum of squared deviations from the mean), all double. The tables the elementwise passes
// need are formed here from the currency, with the same operations in the same precision as the
// reference (flexbn/_core/reference.py), so that one call costs one pass over its tensors and no
// per-table work in Python:
//   shift = T(mean), delta = T(mean - shift), var = T(m2 / max(count, 1)),
//   invstd = 1 / sqrt(var + T(eps)) in T, scale = invstd * weight in T.
// A table has `rows` rows of C values: rows == 1 applies to every segment.

template <class T>
struct Tables {
  i64 G, C;
  std::vector<T> shift, delta, invstd;
  bool any_delta = false;

  Tables(const Geo& g, const double* count, const double* mean, const double* m2, i64 rows,
         double eps)
      : G(g.G), C(g.C), shift(g.G * g.C), delta(g.G * g.C), invstd(g.G * g.C) {
    for (i64 s = 0; s < G; ++s) {
      const i64 r = rows == 1 ? 0 : s;
      const double n = count ? std::max(count[r], 1.0) : 1.0;
      for (i64 c = 0; c < C; ++c) {
        const double mu = mean[r * C + c];
        const T sh = static_cast<T>(mu);
        const T de = static_cast<T>(mu - static_cast<double>(sh));
        const T var = static_cast<T>(m2[r * C + c] / n);
        shift[s * C + c] = sh;
        delta[s * C + c] = de;
        any_delta = any_delta || de != T(0);
        invstd[s * C + c] = T(1) / std::sqrt(var + static_cast<T>(eps));
      }
    }
  }
};

// A (rows, C) parameter as a full (G, C) table, or nullptr.
template <class T>
std::vector<T> full_table(const T* p, i64 rows, i64 G, i64 C) {
  std::vector<T> out;
  if (!p) return out;
  out.resize(G * C);
  for (i64 s = 0; s < G; ++s) std::copy(p + (rows == 1 ? 0 : s) * C, p + (rows == 1 ? 1 : s + 1) * C,
                                        out.begin() + s * C);
  return out;
}

// Channels-last rows of one segment and no mask are independent of their row: k consecutive rows can be
// handed to an elementwise kernel as one row of k * C values, so that its per-row work covers at least
// ~WIDE values. Returns k (1: no merging) and the merged geometry.
constexpr i64 WIDE = 1024;

i64 merge_factor(const Geo& g) {
  if (g.layout != 1 || g.ids || g.mask || g.C >= WIDE || g.C == 0) return 1;
  const i64 rows = g.N * g.L;
  i64 k = 1;
  for (i64 d = 1; d <= WIDE / g.C; ++d)
    if (rows % d == 0) k = d;
  return k;
}

template <class T>
std::vector<T> tiled(const std::vector<T>& t, i64 k) {
  if (t.empty() || k == 1) return t;
  std::vector<T> out(t.size() * k);
  for (i64 i = 0; i < k; ++i) std::copy(t.begin(), t.end(), out.begin() + i * t.size());
  return out;
}

template <class T>
const T* ptr(const std::vector<T>& t) {
  return t.empty() ? nullptr : t.data();
}

template <class T>
void normalize_stats(const T* x, T* y, const Geo& g, const double* count, const double* mean,
                     const double* m2, i64 rows, double eps, const T* weight, i64 weight_rows,
                     const T* bias, i64 bias_rows) {
  const Tables<T> st(g, count, mean, m2, rows, eps);
  std::vector<T> scale = full_table(weight, weight_rows, g.G, g.C);
  if (scale.empty())
    scale = st.invstd;
  else
    for (i64 o = 0; o < g.G * g.C; ++o) scale[o] = st.invstd[o] * scale[o];
  const std::vector<T> b = full_table(bias, bias_rows, g.G, g.C);
  const i64 k = merge_factor(g);
  if (k == 1) {
    normalize(x, y, g, st.shift.data(), st.any_delta ? st.delta.data() : nullptr, scale.data(),
              ptr(b));
    return;
  }
  const Geo wide{g.N * g.L / k, g.C * k, 1, 1, nullptr, 1, nullptr, g.threads};
  const std::vector<T> sh = tiled(st.shift, k), sc = tiled(scale, k), bk = tiled(b, k);
  const std::vector<T> de = st.any_delta ? tiled(st.delta, k) : std::vector<T>();
  normalize(x, y, wide, sh.data(), ptr(de), sc.data(), ptr(bk));
}

// Sums of dy and dy * (x - mean) per (segment, channel), relative to the exact (double) mean:
// sum(dy * (x - shift)) - (mean - shift) * sum(dy).
template <class T>
void backward_sums(const T* dy, const T* x, const Geo& g, const double* mean, i64 rows, double* sg,
                   double* sgx) {
  std::vector<T> shift(g.G * g.C);
  for (i64 s = 0; s < g.G; ++s)
    for (i64 c = 0; c < g.C; ++c)
      shift[s * g.C + c] = static_cast<T>(mean[(rows == 1 ? 0 : s) * g.C + c]);
  sums(dy, x, shift.data(), g, sg, sgx);
  for (i64 s = 0; s < g.G; ++s)
    for (i64 c = 0; c < g.C; ++c) {
      const i64 o = s * g.C + c;
      const double mu = mean[(rows == 1 ? 0 : s) * g.C + c];
      sgx[o] -= (mu - static_cast<double>(shift[o])) * sg[o];
    }
}

// The gradients from the sums (dy through the normalization, as the flags say): with s = invstd,
// scale = s * weight, M the segment's count,
//   k = [grad_var] s^2 sum(dy (x - mean)) / M,   const = [grad_mean] sum(dy) / M - delta * k
//   gx = scale * dy + keep * (-scale * k * (source - shift) - scale * const)   (source = x)
// or, with a separate statistics source z: gx = scale * dy, gz = keep * (...) with source = z.
// Weight and bias gradients come from the local sums (gw = lsgx * s, gb = lsg), summed over segments
// unless the parameter is per segment.
template <class T>
void backward(const T* dy, const T* x, const T* z, T* gx, T* gz, const Geo& g, const double* count,
              const double* mean, const double* m2, i64 rows, double eps, const T* weight,
              i64 weight_rows, const double* sg, const double* sgx, const double* lsg,
              const double* lsgx, bool grad_mean, bool grad_var, T* gw, T* gb,
              i64 bias_rows) {
  const i64 G = g.G, C = g.C;
  const Tables<T> st(g, count, mean, m2, rows, eps);
  std::vector<T> a(G * C), b, d;
  const bool stats = (z ? gz != nullptr : gx != nullptr) && (grad_mean || grad_var);
  if (stats) {
    if (grad_var) b.resize(G * C);
    d.resize(G * C);
  }
  bool any_d = false;
  for (i64 s = 0; s < G; ++s) {
    const double n = std::max(count[rows == 1 ? 0 : s], 1.0);
    for (i64 c = 0; c < C; ++c) {
      const i64 o = s * C + c;
      const double inv = static_cast<double>(st.invstd[o]);
      const double w = weight ? static_cast<double>(weight[(weight_rows == 1 ? 0 : s) * C + c]) : 1.0;
      const double scale = inv * w;
      a[o] = static_cast<T>(scale);
      if (!stats) continue;
      double k = 0, cst = 0;
      if (grad_var) {
        k = inv * inv * sgx[o] / n;
        cst = -static_cast<double>(st.delta[o]) * k;
        b[o] = static_cast<T>(-scale * k);
      }
      if (grad_mean) cst += sg[o] / n;
      d[o] = static_cast<T>(-scale * cst);
      any_d = any_d || d[o] != T(0);
    }
  }
  const T* dp = any_d ? d.data() : nullptr;
  const T* bp = b.empty() ? nullptr : b.data();
  const T* sp = bp ? st.shift.data() : nullptr;
  if (z) {
    if (gx) apply<T>(a.data(), dy, nullptr, nullptr, nullptr, nullptr, gx, g);
    if (gz) {
      if (stats)
        apply<T>(nullptr, nullptr, bp, z, sp, d.data(), gz, g);
      else
        std::fill(gz, gz + g.N * g.C * g.L, T(0));
    }
  } else if (gx) {
    const i64 k = merge_factor(g);
    if (k == 1 || (stats && (bp || dp))) {
      apply<T>(a.data(), dy, stats ? bp : nullptr, stats && bp ? x : nullptr, stats ? sp : nullptr,
               stats ? dp : nullptr, gx, g);
    } else {
      const Geo wide{g.N * g.L / k, g.C * k, 1, 1, nullptr, 1, nullptr, g.threads};
      const std::vector<T> ak = tiled(a, k);
      apply<T>(ak.data(), dy, nullptr, nullptr, nullptr, nullptr, gx, wide);
    }
  }
  if (gw) {  // summed in double over segments, unless the weight is per segment
    std::vector<double> acc(weight_rows * C, 0.0);
    for (i64 s = 0; s < G; ++s)
      for (i64 c = 0; c < C; ++c) {
        const i64 o = s * C + c;
        acc[weight_rows == 1 ? c : o] += lsgx[o] * static_cast<double>(st.invstd[o]);
      }
    for (i64 i = 0; i < weight_rows * C; ++i) gw[i] = static_cast<T>(acc[i]);
  }
  if (gb) {
    std::vector<double> acc(bias_rows * C, 0.0);
    for (i64 s = 0; s < G; ++s)
      for (i64 c = 0; c < C; ++c) acc[bias_rows == 1 ? c : s * C + c] += lsg[s * C + c];
    for (i64 i = 0; i < bias_rows * C; ++i) gb[i] = static_cast<T>(acc[i]);
  }
}

// running <- momentum * batch + (1 - momentum) * running, with the unbiased variance m2 / (count - 1).
// Buffers of `buffer_rows` rows: one row per segment (per-domain buffers, updated where the segment has
// elements), or one row for G segments (the mean over segments of their means and unbiased variances).
// momentum: one value, or one per buffer row (momentum_rows).
template <class P>
void running_update(P* rm, P* rv, i64 buffer_rows, i64 C, i64 G, const double* count,
                    const double* mean, const double* m2, double momentum,
                    const double* momentum_rows) {
  if (buffer_rows == G) {
    for (i64 s = 0; s < G; ++s) {
      if (G > 1 && count[s] <= 0) continue;
      const double mo = momentum_rows ? momentum_rows[s] : momentum;
      for (i64 c = 0; c < C; ++c) {
        const i64 o = s * C + c;
        const double unbiased = m2[o] / (std::max(count[s], G > 1 ? 1.0 : 0.0) - 1.0);
        rm[o] = static_cast<P>(mo * mean[o] + (1 - mo) * static_cast<double>(rm[o]));
        rv[o] = static_cast<P>(mo * unbiased + (1 - mo) * static_cast<double>(rv[o]));
      }
    }
    return;
  }
  const double mo = momentum_rows ? momentum_rows[0] : momentum;
  for (i64 c = 0; c < C; ++c) {
    double mu = 0, var = 0;
    for (i64 s = 0; s < G; ++s) {
      mu += mean[s * C + c];
      var += m2[s * C + c] / (std::max(count[s], 1.0) - 1.0);
    }
    mu /= static_cast<double>(G);
    var /= static_cast<double>(G);
    rm[c] = static_cast<P>(mo * mu + (1 - mo) * static_cast<double>(rm[c]));
    rv[c] = static_cast<P>(mo * var + (1 - mo) * static_cast<double>(rv[c]));
  }
}


// One training forward: moments of the statistics' source, the count check, the running update, the
// normalized output. Returns 0; -2 (nothing written but the moments) when `check` finds a segment of at
// most one value (check 1: every segment; check 2: every segment that has values, e.g. domains); -3
// (likewise) when a mean is not finite.
template <class T>
int forward(const T* x, const T* source, T* y, const Geo& g, double* count, double* mean, double* m2,
            double eps, const T* weight, i64 weight_rows, const T* bias, i64 bias_rows, T* rm, T* rv,
            i64 buffer_rows, double momentum, const double* momentum_rows, int check) {
  moments(source, g, count, mean, m2);
  if (check)
    for (i64 s = 0; s < g.G; ++s)
      if (count[s] <= 1 && (check == 1 || count[s] > 0)) return -2;
  for (i64 o = 0; o < g.G * g.C; ++o)  // inf or NaN values: the caller completes the step (torch's means)
    if (!std::isfinite(mean[o])) return -3;
  if (rm) running_update(rm, rv, buffer_rows, g.C, g.G, count, mean, m2, momentum, momentum_rows);
  normalize_stats(x, y, g, count, mean, m2, g.G, eps, weight, weight_rows, bias, bias_rows);
  return 0;
}

// The whole first-order backward of one process: the sums (when a gradient asked for needs them), then
// the gradients.
template <class T>
void backward_local(const T* dy, const T* x, const T* z, T* gx, T* gz, const Geo& g,
                    const double* count, const double* mean, const double* m2, i64 rows, double eps,
                    const T* weight, i64 weight_rows, bool grad_mean, bool grad_var, T* gw,
                    T* gb, i64 bias_rows) {
  const bool stats = (z ? gz != nullptr : gx != nullptr) && (grad_mean || grad_var);
  std::vector<double> sg, sgx;
  if (stats || gw || gb) {
    sg.resize(g.G * g.C);
    sgx.resize(g.G * g.C);
    backward_sums(dy, x, g, mean, rows, sg.data(), sgx.data());
  }
  backward(dy, x, z, gx, gz, g, count, mean, m2, rows, eps, weight, weight_rows, sg.data(),
           sgx.data(), sg.data(), sgx.data(), grad_mean, grad_var, gw, gb, bias_rows);
}

}  // namespace

#ifndef FLEXBN_SOURCE_ID
#define FLEXBN_SOURCE_ID "unknown"  // the build passes the SHA-256 of this file
#endif
#ifndef FLEXBN_TARGET
#define FLEXBN_TARGET "unknown"  // the build passes the instruction set it compiled for
#endif

#define FLEXBN_EXPORT extern "C" __attribute__((visibility("default")))
#define GEO_ARGS i64 N, i64 C, i64 L, int layout, const i64 *ids, i64 G, const u8 *mask, int threads
#define GEO geo(N, C, L, layout, ids, G, mask, threads)

#define FLEXBN_DEFINE(SUFFIX, T)                                                                    \
  FLEXBN_EXPORT int flexbn_moments_##SUFFIX(const T* x, GEO_ARGS, double* count, double* mean,     \
                                            double* m2) {                                          \
    return guarded(GEO, x && count && mean && m2,                                                  \
                   [&](const Geo& g) { moments(x, g, count, mean, m2); });                         \
  }                                                                                                \
  FLEXBN_EXPORT int flexbn_normalize_##SUFFIX(const T* x, T* y, GEO_ARGS, const T* shift,          \
                                              const T* delta, const T* scale, const T* bias) {     \
    return guarded(GEO, x && y && shift && scale,                                                  \
                   [&](const Geo& g) { normalize(x, y, g, shift, delta, scale, bias); });          \
  }                                                                                                \
  FLEXBN_EXPORT int flexbn_sums_##SUFFIX(const T* dy, const T* x, const T* shift, GEO_ARGS,        \
                                         double* sum_g, double* sum_gx) {                          \
    return guarded(GEO, dy && x && shift && sum_g && sum_gx,                                       \
                   [&](const Geo& g) { sums(dy, x, shift, g, sum_g, sum_gx); });                   \
  }                                                                                                \
  FLEXBN_EXPORT int flexbn_apply_##SUFFIX(const T* a, const T* u, const T* b, const T* v,          \
                                          const T* s, const T* d, T* out, GEO_ARGS) {              \
    return guarded(GEO, out && !a == !u && (!b || (v && s)),                                       \
                   [&](const Geo& g) { apply(a, u, b, v, s, d, out, g); });                        \
  }

FLEXBN_DEFINE(f32, float)
FLEXBN_DEFINE(f64, double)

// The operations on the statistics currency (see above), behind the same guard. forward returns
// results that are not errors: COUNTS when its count check finds a segment of at most one value,
// NONFINITE when a mean is not finite (the input holds inf or NaN); in both cases only the moments are
// written.
constexpr int COUNTS = 1, NONFINITE = 2;

#define FLEXBN_DEFINE_OPS(SUFFIX, T)                                                                \
  FLEXBN_EXPORT int flexbn_normalize_stats_##SUFFIX(                                               \
      const T* x, T* y, GEO_ARGS, const double* count, const double* mean, const double* m2,       \
      i64 rows, double eps, const T* weight, i64 weight_rows, const T* bias, i64 bias_rows) {      \
    return guarded(GEO, x && y && count && mean && m2 && rows >= 1, [&](const Geo& g) {           \
      normalize_stats(x, y, g, count, mean, m2, rows, eps, weight, weight_rows, bias, bias_rows);  \
    });                                                                                            \
  }                                                                                                \
  FLEXBN_EXPORT int flexbn_backward_sums_##SUFFIX(const T* dy, const T* x, GEO_ARGS,               \
                                                  const double* mean, i64 rows, double* sum_g,     \
                                                  double* sum_gx) {                                \
    return guarded(GEO, dy && x && mean && sum_g && sum_gx && rows >= 1,                           \
                   [&](const Geo& g) { backward_sums(dy, x, g, mean, rows, sum_g, sum_gx); });     \
  }                                                                                                \
  FLEXBN_EXPORT int flexbn_backward_##SUFFIX(                                                      \
      const T* dy, const T* x, const T* z, T* gx, T* gz, GEO_ARGS, const double* count,            \
      const double* mean, const double* m2, i64 rows, double eps, const T* weight,                 \
      i64 weight_rows, const double* sg, const double* sgx, const double* lsg,                     \
      const double* lsgx, int grad_mean, int grad_var, T* gw, T* gb, i64 bias_rows) {              \
    const bool stats = (z ? gz != nullptr : gx != nullptr) && (grad_mean || grad_var);             \
    return guarded(GEO,                                                                            \
                   dy && x && count && mean && m2 && rows >= 1 && (!stats || (sg && sgx)) &&        \
                       (!(gw || gb) || (lsg && lsgx)) && (!gz || z),                               \
                   [&](const Geo& g) {                                                             \
                     backward(dy, x, z, gx, gz, g, count, mean, m2, rows, eps, weight,              \
                              weight_rows, sg, sgx, lsg, lsgx, grad_mean != 0, grad_var != 0, gw,   \
                              gb, bias_rows);                                                      \
                   });                                                                             \
  }                                                                                                \
  FLEXBN_EXPORT int flexbn_forward_##SUFFIX(                                                       \
      const T* x, const T* source, T* y, GEO_ARGS, double* count, double* mean, double* m2,        \
      double eps, const T* weight, i64 weight_rows, const T* bias, i64 bias_rows, T* rm, T* rv,    \
      i64 buffer_rows, double momentum, const double* momentum_rows, int check) {                  \
    int rc = 0;                                                                                    \
    const int code =                                                                               \
        guarded(GEO, x && source && y && count && mean && m2 && (!rm == !rv), [&](const Geo& g) {  \
          rc = forward(x, source, y, g, count, mean, m2, eps, weight, weight_rows, bias,           \
                       bias_rows, rm, rv, buffer_rows, momentum, momentum_rows, check);            \
        });                                                                                        \
    return code != OK ? code : (rc == -2 ? COUNTS : rc == -3 ? NONFINITE : OK);                   \
  }                                                                                                \
  FLEXBN_EXPORT int flexbn_backward_local_##SUFFIX(                                                \
      const T* dy, const T* x, const T* z, T* gx, T* gz, GEO_ARGS, const double* count,            \
      const double* mean, const double* m2, i64 rows, double eps, const T* weight,                 \
      i64 weight_rows, int grad_mean, int grad_var, T* gw, T* gb, i64 bias_rows) {                 \
    return guarded(GEO, dy && x && count && mean && m2 && rows >= 1 && (!gz || z),                 \
                   [&](const Geo& g) {                                                             \
                     backward_local(dy, x, z, gx, gz, g, count, mean, m2, rows, eps, weight,        \
                                    weight_rows, grad_mean != 0, grad_var != 0, gw, gb, bias_rows); \
                   });                                                                             \
  }                                                                                                \
  FLEXBN_EXPORT int flexbn_running_update_##SUFFIX(                                                \
      T* rm, T* rv, i64 buffer_rows, i64 C, i64 G, const double* count, const double* mean,        \
      const double* m2, double momentum, const double* momentum_rows) {                            \
    const Geo none{0, C, 0, 0, nullptr, G, nullptr, 1};                                            \
    return guarded(none, rm && rv && count && mean && m2 && (buffer_rows == 1 || buffer_rows == G), \
                   [&](const Geo&) {                                                               \
                     running_update(rm, rv, buffer_rows, C, G, count, mean, m2, momentum,           \
                                    momentum_rows);                                                \
                   });                                                                             \
  }

FLEXBN_DEFINE_OPS(f32, float)
FLEXBN_DEFINE_OPS(f64, double)

// 2: error codes -2 (out of memory), -3 (other C++ exception), -4 (invalid arguments), last_error.
// 3: the operations on the statistics currency (normalize_stats, backward_sums, backward, forward,
//    backward_local, running_update).
FLEXBN_EXPORT int flexbn_abi_version() { return 3; }

// The message of this thread's last failed call.
FLEXBN_EXPORT const char* flexbn_last_error() { return last_error; }

// What this library was built from and for.
FLEXBN_EXPORT const char* flexbn_source_id() { return FLEXBN_SOURCE_ID; }
FLEXBN_EXPORT const char* flexbn_target() { return FLEXBN_TARGET; }

// The highest x86-64 level (1 to 4) this processor and its operating system support, 0 elsewhere: which
// of the libraries built for each level may be loaded. Only meaningful in the baseline build.
FLEXBN_EXPORT int flexbn_cpu_level() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
#if !defined(__clang__) && __GNUC__ >= 12
  if (__builtin_cpu_supports("x86-64-v4")) return 4;
  if (__builtin_cpu_supports("x86-64-v3")) return 3;
  if (__builtin_cpu_supports("x86-64-v2")) return 2;
#else
  const bool v2 = __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("popcnt") &&
                  __builtin_cpu_supports("ssse3");
  const bool v3 = v2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
  if (v4) return 4;
  if (v3) return 3;
  if (v2) return 2;
#endif
  return 1;
#else
  return 0;
#endif
}
