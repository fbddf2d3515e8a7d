// Runs the FSLA (BOAT) CUDA kernels under the host emulation (cuda_emulation.h) and checks them
// against naive host implementations written from docs/feature_space_attention.md: the leaf
// layout by recursive floor/ceil splitting, the clustering rule in float32 with the kernels'
// summation order (so perms must match exactly), and attention forward/backward in double.
// float/half/bfloat16; equal and unequal leaves, L = 0, overlap > sibling size, empty leaves.
// Built with -fsanitize=address by tests/test_ops/test_fsla_cuda_compile.py. Exit 0 = all ok.
#include "cuda_emulation.h"
// clang-format off
#include "cuda/feature_space_attention_kernels.cuh"
// clang-format on

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

namespace fs = mmboat::cuda::fsla;

static int g_failures = 0;

// Leaves (offset, size) by recursive splitting.
static std::vector<std::pair<int64_t, int64_t>> leaves_of(int64_t n, int64_t m) {
  std::vector<std::pair<int64_t, int64_t>> g{{0, n}};
  int levels = 0;
  while ((m << levels) < n) ++levels;
  for (int l = 0; l < levels; ++l) {
    std::vector<std::pair<int64_t, int64_t>> next;
    for (auto [off, sz] : g) {
      next.push_back({off, sz / 2});
      next.push_back({off + sz / 2, sz - sz / 2});
    }
    g = next;
  }
  return g;
}

static void normalise(float* c, int64_t d) {
  float sq = 0.f;
  for (int64_t i = 0; i < d; ++i) sq += c[i] * c[i];
  const float inv = 1.0f / std::max(std::sqrt(sq), 1e-12f);
  for (int64_t i = 0; i < d; ++i) c[i] *= inv;
}

static std::vector<int64_t> cluster_host(const std::vector<float>& x, int64_t rows, int64_t n,
                                         int64_t d, int64_t m, int iters, float tau) {
  std::vector<float> xn(x);
  for (int64_t t = 0; t < rows * n; ++t) normalise(&xn[t * d], d);
  std::vector<int64_t> perm(rows * n);
  for (int64_t t = 0; t < rows * n; ++t) perm[t] = t % n;
  int levels = 0;
  while ((m << levels) < n) ++levels;
  std::vector<std::pair<int64_t, int64_t>> groups{{0, n}};
  for (int l = 0; l < levels; ++l) {
    for (int64_t r = 0; r < rows; ++r)
      for (auto [off, sz] : groups) {
        if (sz < 2) continue;
        int64_t* ord = &perm[r * n + off];
        const float* xr = &x[r * n * d];
        const float* nr = &xn[r * n * d];
        std::vector<float> c0(d, 0.f), c1(d, 0.f), w(sz);
        const int64_t half = sz / 2;
        for (int64_t c = 0; c < d; ++c) {
          for (int64_t t = 0; t < half; ++t) c0[c] += xr[ord[t] * d + c];
          for (int64_t t = half; t < sz; ++t) c1[c] += xr[ord[t] * d + c];
          c0[c] *= 1.0f / float(half);
          c1[c] *= 1.0f / float(sz - half);
        }
        normalise(c0.data(), d);
        normalise(c1.data(), d);
        auto cosines = [&](int64_t t, float& s0, float& s1) {
          s0 = s1 = 0.f;
          for (int64_t c = 0; c < d; ++c) {
            s0 += nr[ord[t] * d + c] * c0[c];
            s1 += nr[ord[t] * d + c] * c1[c];
          }
        };
        for (int it = 0; it < iters; ++it) {
          for (int64_t t = 0; t < sz; ++t) {
            float s0, s1;
            cosines(t, s0, s1);
            const float z0 = tau * s0, z1 = tau * s1, mx = std::max(z0, z1);
            const float e0 = std::exp(z0 - mx), e1 = std::exp(z1 - mx);
            w[t] = e0 / (e0 + e1);
          }
          for (int64_t c = 0; c < d; ++c) {
            float a = 0.f, b = 0.f;
            for (int64_t t = 0; t < sz; ++t) {
              a += w[t] * xr[ord[t] * d + c];
              b += (1.0f - w[t]) * xr[ord[t] * d + c];
            }
            c0[c] = a;
            c1[c] = b;
          }
          normalise(c0.data(), d);
          normalise(c1.data(), d);
        }
        std::vector<std::pair<float, int64_t>> keyed(sz);
        for (int64_t t = 0; t < sz; ++t) {
          float s0, s1;
          cosines(t, s0, s1);
          keyed[t] = {(1.0f + s0) / (1.0f + s1), ord[t]};
        }
        std::stable_sort(keyed.begin(), keyed.end(),
                         [](auto& a, auto& b) { return a.first < b.first; });
        for (int64_t t = 0; t < sz; ++t) ord[t] = keyed[t].second;
      }
    std::vector<std::pair<int64_t, int64_t>> next;
    for (auto [off, sz] : groups) {
      next.push_back({off, sz / 2});
      next.push_back({off + sz / 2, sz - sz / 2});
    }
    groups = next;
  }
  return perm;
}

static void check_cluster(int64_t rows, int64_t n, int64_t d, int64_t m, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  std::vector<float> x(rows * n * d);
  for (auto& v : x) v = nd(rng);
  std::vector<float> fscratch(fs::bhc_float_scratch(rows, n, d));
  std::vector<int64_t> keys(fs::bhc_key_scratch_bytes(rows, n) / 8 + 1), tok(rows * n),
      perm(rows * n), inv(rows * n);
  const char* err = fs::launch_bhc_cluster(x.data(), rows, n, d, m, 2, 100.f, fscratch.data(),
                                           keys.data(), tok.data(), perm.data(), inv.data(),
                                           nullptr);
  const std::vector<int64_t> ref = cluster_host(x, rows, n, d, m, 2, 100.f);
  bool ok = err == nullptr && perm == ref;
  for (int64_t r = 0; ok && r < rows; ++r)
    for (int64_t t = 0; t < n; ++t) ok = ok && inv[r * n + perm[r * n + t]] == t;
  std::printf("%s cluster rows=%lld n=%lld d=%lld m=%lld\n", ok ? "ok" : "FAIL", (long long)rows,
              (long long)n, (long long)d, (long long)m);
  if (!ok) ++g_failures;
}

template <typename T>
static double to_f(T v) {
  return fs::Elem<T>::load(v);
}

template <typename T>
static void check_attention(const char* name, int64_t rows, int64_t n, int64_t d, int64_t m,
                            int64_t o, double tol, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  const int64_t total = rows * n * d;
  std::vector<T> q(total), k(total), v(total), go(total), out(total), lse(rows * n), gq(total),
      gk(total), gv(total);
  for (auto* vec : {&q, &k, &v, &go})
    for (auto& e : *vec) e = fs::Elem<T>::store(nd(rng));
  std::vector<int64_t> perm(rows * n);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<int64_t> p(n);
    for (int64_t t = 0; t < n; ++t) p[t] = t;
    std::shuffle(p.begin(), p.end(), rng);
    std::copy(p.begin(), p.end(), perm.begin() + r * n);
  }
  const float scale = 1.0f / std::sqrt(float(d));
  const fs::AttnProblem p = fs::make_attn_problem(rows, n, d, m, o, scale);
  const char* err = fs::launch_attention_forward<T>(p, q.data(), k.data(), v.data(), perm.data(),
                                                    out.data(), lse.data(), 227 * 1024, nullptr);
  std::vector<fs::acc_t<T>> gk_acc(total, 0.f), gv_acc(total, 0.f);
  if (!err)
    err = fs::launch_attention_backward<T>(p, go.data(), q.data(), k.data(), v.data(),
                                           out.data(), perm.data(), gq.data(), gk_acc.data(),
                                           gv_acc.data(), gk.data(), gv.data(), 227 * 1024,
                                           nullptr);
  // Naive double reference.
  std::vector<double> r_out(total, 0), r_lse(rows * n), r_gq(total, 0), r_gk(total, 0),
      r_gv(total, 0);
  const auto leaves = leaves_of(n, m);
  const bool multi = leaves.size() > 1;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r * n;
    for (size_t li = 0; li < leaves.size(); ++li) {
      auto [off, sz] = leaves[li];
      std::vector<int64_t> keys;
      for (int64_t j = 0; j < sz; ++j) keys.push_back(perm[b + off + j]);
      if (multi && o > 0) {
        auto [soff, ssz] = leaves[li ^ 1];
        const int64_t take = std::min(o, ssz);
        const int64_t start = (li & 1) ? soff + ssz - take : soff;
        for (int64_t j = 0; j < take; ++j) keys.push_back(perm[b + start + j]);
      }
      for (int64_t t = 0; t < sz; ++t) {
        const int64_t qt = perm[b + off + t];
        std::vector<double> s(keys.size()), dp(keys.size());
        double mx = -1e300;
        for (size_t j = 0; j < keys.size(); ++j) {
          double acc = 0;
          for (int64_t c = 0; c < d; ++c)
            acc += double(to_f(q[(b + qt) * d + c])) * to_f(k[(b + keys[j]) * d + c]);
          s[j] = acc * scale;
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (auto& e : s) sum += std::exp(e - mx);
        r_lse[b + qt] = mx + std::log(sum);
        for (size_t j = 0; j < keys.size(); ++j) s[j] = std::exp(s[j] - mx) / sum;
        double delta = 0;
        for (int64_t c = 0; c < d; ++c) {
          double acc = 0;
          for (size_t j = 0; j < keys.size(); ++j) acc += s[j] * to_f(v[(b + keys[j]) * d + c]);
          r_out[(b + qt) * d + c] = acc;
          delta += acc * to_f(go[(b + qt) * d + c]);
        }
        for (size_t j = 0; j < keys.size(); ++j) {
          double acc = 0;
          for (int64_t c = 0; c < d; ++c)
            acc += double(to_f(go[(b + qt) * d + c])) * to_f(v[(b + keys[j]) * d + c]);
          const double ds = s[j] * (acc - delta) * scale;
          for (int64_t c = 0; c < d; ++c) {
            r_gq[(b + qt) * d + c] += ds * to_f(k[(b + keys[j]) * d + c]);
            r_gk[(b + keys[j]) * d + c] += ds * to_f(q[(b + qt) * d + c]);
            r_gv[(b + keys[j]) * d + c] += s[j] * to_f(go[(b + qt) * d + c]);
          }
        }
      }
    }
  }
  double worst = 0;
  auto cmp = [&](const std::vector<T>& got, const std::vector<double>& ref) {
    for (size_t i = 0; i < ref.size(); ++i) {
      const double g = to_f(got[i]);
      const double e = std::abs(g - ref[i]) / (1.0 + std::abs(ref[i]));
      worst = std::max(worst, std::isfinite(g) ? e : 1e30);
    }
  };
  cmp(out, r_out);
  cmp(lse, r_lse);
  cmp(gq, r_gq);
  cmp(gk, r_gk);
  cmp(gv, r_gv);
  const bool ok = err == nullptr && worst <= tol;
  std::printf("%s attention %s rows=%lld n=%lld d=%lld m=%lld o=%lld err=%.3g%s%s\n",
              ok ? "ok" : "FAIL", name, (long long)rows, (long long)n, (long long)d,
              (long long)m, (long long)o, worst, err ? " launch: " : "", err ? err : "");
  if (!ok) ++g_failures;
}

int main() {
  std::mt19937 rng(1234);
  // (n, d, m): equal leaves, unequal leaves, L = 0, tiny leaves with empty groups.
  check_cluster(2, 64, 8, 16, rng);
  check_cluster(2, 37, 5, 8, rng);
  check_cluster(1, 20, 4, 49, rng);
  check_cluster(1, 9, 3, 1, rng);
  check_cluster(1, 300, 33, 7, rng);  // groups larger than the block, d > 32
  const int64_t cases[][4] = {
      {64, 16, 16, 5},  // equal leaves
      {37, 8, 8, 3},    // unequal leaves
      {20, 12, 49, 20}, // L = 0
      {23, 40, 4, 3},   // leaves of 2/3 tokens: overlap > sibling size; d > 32
      {9, 5, 1, 0},     // leaves of one token, empty leaves
      {70, 33, 40, 39}, // max keys > 32 (several key passes per lane)
  };
  for (const auto& c : cases) {
    check_attention<float>("float", 2, c[0], c[1], c[2], c[3], 1e-4, rng);
    check_attention<__half>("half", 1, c[0], c[1], c[2], c[3], 2e-2, rng);
    check_attention<__nv_bfloat16>("bfloat16", 1, c[0], c[1], c[2], c[3], 1e-1, rng);
    check_attention<double>("double", 2, c[0], c[1], c[2], c[3], 1e-12, rng);
  }
  std::printf(g_failures ? "FAILURES: %d\n" : "ALL OK\n", g_failures);
  return g_failures ? 1 : 0;
}
