// flexbn's CPU kernels: the four passes of batch norm over a segmented batch, for float and double.
//
// Built at first use by flexbn/_core/kernels.py with the system C++ compiler (OpenMP, -O3, the host's
// vector instructions), cached on disk, and called through ctypes with raw pointers: no torch headers,
// seconds to build. Every function returns 0, or -1 when a segment id is out of range.
//
// Geometry shared by every kernel. The input is viewed either as
//   NCL: x[n][c][l] (contiguous tensors of rank >= 3), or
//   NLC: x[n][l][c] (channels_last tensors, and (N, C) with L = 1),
// with N samples, C channels, L positions per sample and channel. Sample n belongs to segment ids[n]
// (ids == nullptr: one segment, G = 1); mask[n * L + l] == 0 removes position l of sample n from every
// reduction (mask == nullptr: all kept). Per-(segment, channel) parameters are (G, C) row-major.
//
// Numerics: moments are exact-centred in double. Each run of at most a few thousand elements of one
// (segment, channel) is reduced in two passes while it sits in cache -- its mean, then the sums of
// (x - mean) and (x - mean)^2 -- and runs are merged with Chan's formulas, so nothing is formed as
// E[x^2] - E[x]^2. Backward sums accumulate in double. Threads split channels (NCL) or rows (NLC) in a
// fixed way and merge in a fixed order: results do not depend on timing, only on the thread count.

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using i64 = std::int64_t;
using u8 = std::uint8_t;

constexpr i64 RUN = 4096;         // elements of one (segment, channel) reduced while in cache (NCL)
constexpr i64 BLOCK_BYTES = 32768;  // bytes of rows reduced while in cache (NLC)

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

int threads_for(i64 work, int threads) {
  return static_cast<int>(std::max<i64>(1, std::min<i64>(threads, work)));
}

// ---------------------------------------------------------------------------------------------------
// Moments: count[g], mean[g][c], m2[g][c] (sum of squared deviations from the mean).

template <class T>
void moments_ncl(const T* x, const Geo& g, double* count, double* mean, double* m2) {
  const i64 N = g.N, C = g.C, L = g.L;
#pragma omp parallel num_threads(threads_for(C, g.threads))
  {
    std::vector<double> seen(g.G);
#pragma omp for schedule(static)
    for (i64 c = 0; c < C; ++c) {
      std::fill(seen.begin(), seen.end(), 0.0);
      for (i64 n = 0; n < N; ++n) {
        const i64 s = seg_of(g, n), o = s * C + c;
        const T* row = x + (n * C + c) * L;
        const u8* m = g.mask ? g.mask + n * L : nullptr;
        for (i64 l0 = 0; l0 < L; l0 += RUN) {
          const i64 len = std::min(RUN, L - l0);
          const T* v = row + l0;
          double sum = 0, k = 0;
          if (m) {
            const u8* mk = m + l0;
#pragma omp simd reduction(+ : sum, k)
            for (i64 l = 0; l < len; ++l) {
              const bool keep = mk[l] != 0;
              sum += keep ? static_cast<double>(v[l]) : 0.0;
              k += keep ? 1.0 : 0.0;
            }
          } else {
#pragma omp simd reduction(+ : sum)
            for (i64 l = 0; l < len; ++l) sum += static_cast<double>(v[l]);
            k = static_cast<double>(len);
          }
          if (k == 0) continue;
          const double mu = sum / k;
          double s1 = 0, s2 = 0;
          if (m) {
            const u8* mk = m + l0;
#pragma omp simd reduction(+ : s1, s2)
            for (i64 l = 0; l < len; ++l) {
              const double d = mk[l] ? static_cast<double>(v[l]) - mu : 0.0;
              s1 += d;
              s2 += d * d;
            }
          } else {
#pragma omp simd reduction(+ : s1, s2)
            for (i64 l = 0; l < len; ++l) {
              const double d = static_cast<double>(v[l]) - mu;
              s1 += d;
              s2 += d * d;
            }
          }
          const double run_mean = mu + s1 / k, run_m2 = std::max(0.0, s2 - s1 * s1 / k);
          if (seen[s] == 0) {
            mean[o] = run_mean;
            m2[o] = run_m2;
          } else {
            merge(seen[s], mean[o], m2[o], k, run_mean, run_m2);
          }
          seen[s] += k;
        }
      }
    }
  }
}

// NLC: rows r = n * L + l of C contiguous values. Rows [r0, r1) and channels [c0, c1) are reduced into
// seen[G] (per-thread counts) and mean/m2 (row stride C), using scratch of 3 * (c1 - c0) doubles.
template <class T>
void moments_nlc_part(const T* x, const Geo& g, i64 r0, i64 r1, i64 c0, i64 c1, double* seen,
                      double* mean, double* m2, double* scratch) {
  const i64 C = g.C, L = g.L, w = c1 - c0;
  const i64 block = std::max<i64>(1, BLOCK_BYTES / static_cast<i64>(w * sizeof(T)));
  double *sum = scratch, *s1 = scratch + w, *s2 = scratch + 2 * w;
  for (i64 r = r0; r < r1;) {
    const i64 s = seg_of(g, r / L);
    i64 e = std::min(r1, r + block);
    if (g.ids) {  // a block holds one segment
      i64 stop = r + 1;
      while (stop < e && g.ids[stop / L] == s) ++stop;
      e = stop;
    }
    std::fill(sum, sum + w, 0.0);
    double k = 0;
    for (i64 q = r; q < e; ++q) {
      if (g.mask && !g.mask[q]) continue;
      k += 1;
      const T* v = x + q * C + c0;
#pragma omp simd
      for (i64 c = 0; c < w; ++c) sum[c] += static_cast<double>(v[c]);
    }
    if (k > 0) {
      for (i64 c = 0; c < w; ++c) sum[c] /= k;  // now the block mean
      std::fill(s1, s1 + w, 0.0);
      std::fill(s2, s2 + w, 0.0);
      for (i64 q = r; q < e; ++q) {
        if (g.mask && !g.mask[q]) continue;
        const T* v = x + q * C + c0;
#pragma omp simd
        for (i64 c = 0; c < w; ++c) {
          const double d = static_cast<double>(v[c]) - sum[c];
          s1[c] += d;
          s2[c] += d * d;
        }
      }
      double* mo = mean + s * C + c0;
      double* qo = m2 + s * C + c0;
      for (i64 c = 0; c < w; ++c) {
        const double bm = sum[c] + s1[c] / k, bq = std::max(0.0, s2[c] - s1[c] * s1[c] / k);
        if (seen[s] == 0) {
          mo[c] = bm;
          qo[c] = bq;
        } else {
          merge(seen[s], mo[c], qo[c], k, bm, bq);
        }
      }
      seen[s] += k;
    }
    r = e;
  }
}

// Per-thread accumulators of this many doubles at most; beyond, threads split channels instead of rows.
constexpr i64 PRIVATE_LIMIT = i64(1) << 20;

template <class T>
void moments_nlc(const T* x, const Geo& g, double* count, double* mean, double* m2) {
  const i64 R = g.N * g.L, C = g.C, G = g.G;
  const int nt = threads_for(R, g.threads);
  if (nt == 1 || G * C > PRIVATE_LIMIT) {
    // Channel slices of at least 16 values (a cache line of floats) per thread.
    const int ct = threads_for((C + 15) / 16, g.threads);
    std::fill(count, count + G, 0.0);
#pragma omp parallel num_threads(ct)
    {
      const int t = omp_get_thread_num(), T_ = omp_get_num_threads();
      const i64 c0 = C * t / T_, c1 = C * (t + 1) / T_;
      std::vector<double> seen(G, 0.0), scratch(3 * (c1 - c0));
      if (c1 > c0) moments_nlc_part(x, g, 0, R, c0, c1, seen.data(), mean, m2, scratch.data());
      if (t == 0)
        for (i64 s = 0; s < G; ++s) count[s] = seen[s];
    }
    return;
  }
  std::vector<std::vector<double>> seen(nt), mo(nt), qo(nt);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T_ = omp_get_num_threads();
    const i64 r0 = R * t / T_, r1 = R * (t + 1) / T_;
    seen[t].assign(G, 0.0);
    mo[t].assign(G * C, 0.0);
    qo[t].assign(G * C, 0.0);
    std::vector<double> scratch(3 * C);
    moments_nlc_part(x, g, r0, r1, 0, C, seen[t].data(), mo[t].data(), qo[t].data(), scratch.data());
  }
  for (i64 s = 0; s < G; ++s) {
    double n = 0;
    for (int t = 0; t < nt; ++t) {
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
  if (g.layout == 0) {
    moments_ncl(x, g, count, mean, m2);
    std::fill(count, count + g.G, 0.0);
    for (i64 n = 0; n < g.N; ++n) {
      double k = static_cast<double>(g.L);
      if (g.mask) {
        k = 0;
        for (i64 l = 0; l < g.L; ++l) k += g.mask[n * g.L + l] ? 1 : 0;
      }
      count[seg_of(g, n)] += k;
    }
  } else {
    moments_nlc(x, g, count, mean, m2);
  }
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
#pragma omp parallel for schedule(static) num_threads(threads_for(rows, g.threads))
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
#pragma omp parallel for schedule(static) num_threads(threads_for(rows / 8 + 1, g.threads))
    for (i64 r = 0; r < rows; ++r) {
      const i64 o = seg_of(g, r / L) * C;
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
#pragma omp parallel for schedule(static) num_threads(threads_for(rows, g.threads))
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
      } else {
#pragma omp simd
        for (i64 l = 0; l < L; ++l) {
          const T first = uu ? A * uu[l] : T(0);
          const T second = (vv ? B * (vv[l] - S) : T(0)) + D;
          w[l] = m[l] ? first + second : first;
        }
      }
    }
  } else {
    const i64 rows = g.N * L;
#pragma omp parallel for schedule(static) num_threads(threads_for(rows / 8 + 1, g.threads))
    for (i64 r = 0; r < rows; ++r) {
      const i64 o = seg_of(g, r / L) * C, base = r * C;
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
      } else {
        for (i64 c = 0; c < C; ++c) w[c] = affine_term(A, uu, B, vv, S, D, keep, c, c);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward sums over each segment's kept elements: sum_g[g][c] = sum(dy), sum_gx[g][c] = sum(dy * (x -
// shift[g][c])), accumulated in double.

template <class T>
void sums_nlc_part(const T* dy, const T* x, const T* shift, const Geo& g, i64 r0, i64 r1, i64 c0,
                   i64 c1, double* sg, double* sgx) {
  const i64 C = g.C, L = g.L, w = c1 - c0;
  for (i64 r = r0; r < r1; ++r) {
    if (g.mask && !g.mask[r]) continue;
    const i64 o = seg_of(g, r / L) * C + c0;
    const T *gv = dy + r * C + c0, *xv = x + r * C + c0, *sh = shift + o;
    double *a = sg + o, *b = sgx + o;
#pragma omp simd
    for (i64 c = 0; c < w; ++c) {
      const double gg = static_cast<double>(gv[c]);
      a[c] += gg;
      b[c] += gg * static_cast<double>(xv[c] - sh[c]);
    }
  }
}

template <class T>
void sums(const T* dy, const T* x, const T* shift, const Geo& g, double* sg, double* sgx) {
  const i64 N = g.N, C = g.C, L = g.L, G = g.G;
  std::fill(sg, sg + G * C, 0.0);
  std::fill(sgx, sgx + G * C, 0.0);
  if (g.layout == 0) {
#pragma omp parallel for schedule(static) num_threads(threads_for(C, g.threads))
    for (i64 c = 0; c < C; ++c) {
      for (i64 n = 0; n < N; ++n) {
        const i64 o = seg_of(g, n) * C + c, base = (n * C + c) * L;
        const T *gv = dy + base, *xv = x + base;
        const T sh = shift[o];
        double a = 0, b = 0;
        if (g.mask) {
          const u8* m = g.mask + n * L;
#pragma omp simd reduction(+ : a, b)
          for (i64 l = 0; l < L; ++l) {
            const double gg = m[l] ? static_cast<double>(gv[l]) : 0.0;
            a += gg;
            b += m[l] ? gg * static_cast<double>(xv[l] - sh) : 0.0;
          }
        } else {
#pragma omp simd reduction(+ : a, b)
          for (i64 l = 0; l < L; ++l) {
            const double gg = static_cast<double>(gv[l]);
            a += gg;
            b += gg * static_cast<double>(xv[l] - sh);
          }
        }
        sg[o] += a;
        sgx[o] += b;
      }
    }
    return;
  }
  const i64 R = N * L;
  const int nt = threads_for(R, g.threads);
  if (nt == 1 || G * C > PRIVATE_LIMIT) {
    const int ct = threads_for((C + 15) / 16, g.threads);
#pragma omp parallel num_threads(ct)
    {
      const int t = omp_get_thread_num(), T_ = omp_get_num_threads();
      const i64 c0 = C * t / T_, c1 = C * (t + 1) / T_;
      if (c1 > c0) sums_nlc_part(dy, x, shift, g, 0, R, c0, c1, sg, sgx);
    }
    return;
  }
  std::vector<std::vector<double>> pa(nt), pb(nt);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T_ = omp_get_num_threads();
    pa[t].assign(G * C, 0.0);
    pb[t].assign(G * C, 0.0);
    sums_nlc_part(dy, x, shift, g, R * t / T_, R * (t + 1) / T_, 0, C, pa[t].data(), pb[t].data());
  }
  for (int t = 0; t < nt; ++t)
    for (i64 o = 0; o < G * C; ++o) {
      sg[o] += pa[t][o];
      sgx[o] += pb[t][o];
    }
}

Geo geo(i64 N, i64 C, i64 L, int layout, const i64* ids, i64 G, const u8* mask, int threads) {
  return Geo{N, C, L, layout, ids, ids ? G : 1, mask, std::max(1, threads)};
}

}  // namespace

#define FLEXBN_EXPORT extern "C" __attribute__((visibility("default")))
#define GEO_ARGS i64 N, i64 C, i64 L, int layout, const i64 *ids, i64 G, const u8 *mask, int threads
#define GEO geo(N, C, L, layout, ids, G, mask, threads)

#define FLEXBN_DEFINE(SUFFIX, T)                                                                    \
  FLEXBN_EXPORT int flexbn_moments_##SUFFIX(const T* x, GEO_ARGS, double* count, double* mean,     \
                                            double* m2) {                                          \
    const Geo g = GEO;                                                                             \
    if (!ids_ok(g)) return -1;                                                                     \
    moments(x, g, count, mean, m2);                                                                \
    return 0;                                                                                      \
  }                                                                                                \
  FLEXBN_EXPORT int flexbn_normalize_##SUFFIX(const T* x, T* y, GEO_ARGS, const T* shift,          \
                                              const T* delta, const T* scale, const T* bias) {     \
    const Geo g = GEO;                                                                             \
    if (!ids_ok(g)) return -1;                                                                     \
    normalize(x, y, g, shift, delta, scale, bias);                                                 \
    return 0;                                                                                      \
  }                                                                                                \
  FLEXBN_EXPORT int flexbn_sums_##SUFFIX(const T* dy, const T* x, const T* shift, GEO_ARGS,        \
                                         double* sum_g, double* sum_gx) {                          \
    const Geo g = GEO;                                                                             \
    if (!ids_ok(g)) return -1;                                                                     \
    sums(dy, x, shift, g, sum_g, sum_gx);                                                          \
    return 0;                                                                                      \
  }                                                                                                \
  FLEXBN_EXPORT int flexbn_apply_##SUFFIX(const T* a, const T* u, const T* b, const T* v,          \
                                          const T* s, const T* d, T* out, GEO_ARGS) {              \
    const Geo g = GEO;                                                                             \
    if (!ids_ok(g)) return -1;                                                                     \
    apply(a, u, b, v, s, d, out, g);                                                               \
    return 0;                                                                                      \
  }

FLEXBN_DEFINE(f32, float)
FLEXBN_DEFINE(f64, double)

FLEXBN_EXPORT int flexbn_abi_version() { return 1; }
