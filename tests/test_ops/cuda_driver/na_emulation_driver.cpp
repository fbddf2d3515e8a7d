// Runs the neighborhood-attention CUDA kernels under the host emulation (cuda_emulation.h) and
// checks them against a naive double-precision implementation of docs/neighborhood_attention.md:
// every kernel (fused forward/backward, unfused qk/av and their backwards), float/half/bfloat16,
// 1-D/2-D/3-D, dilation, causal, even kernels, rpb, head_dim fast path / odd / multi-pass, and
// shared-memory chunking. Also checks the inverse-window rule against the forward rule by brute
// force. Built with -fsanitize=address by tests/test_ops/test_cuda_kernels_compile.py, so any
// out-of-range access of a tensor aborts. Exit status 0 = all checks passed.
#include "cuda_emulation.h"
// clang-format off
#include "cuda/neighborhood_attention_kernels.cuh"
// clang-format on

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>

namespace na = mmboat::cuda::na;

static int g_failures = 0;

// ---------------------------------------------------------------- inverse window, brute force
static void check_inverse_rule() {
  int checked = 0;
  for (int L = 1; L <= 24; ++L)
    for (int k = 1; k <= L; ++k)
      for (int d = 1; k * d <= L; ++d)
        for (int causal = 0; causal < 2; ++causal)
          for (int g = 0; g < d; ++g) {
            const int lg = na::group_length(L, d, g);
            for (int kj = 0; kj < lg; ++kj) {
              int lo, hi;
              na::inverse_window(kj, lg, k, causal != 0, &lo, &hi);
              for (int qi = 0; qi < lg; ++qi) {
                const int st = na::window_start(qi, lg, k, causal != 0);
                const int cnt = na::window_count(qi, st, k, causal != 0);
                const bool sees = kj >= st && kj < st + cnt;
                const bool in_range = qi >= lo && qi <= hi;
                ++checked;
                if (sees != in_range) {
                  std::printf("FAIL inverse L=%d k=%d d=%d causal=%d key=%d query=%d\n", L, k, d,
                              causal, kj, qi);
                  ++g_failures;
                  return;
                }
              }
            }
          }
  std::printf("inverse window rule: %d (key, query) pairs ok\n", checked);
}

// ---------------------------------------------------------------- naive reference (double)
struct Axis {
  int L, k, d;
  bool causal;
};

// Keys of query x on one axis, written from the spec text: (key index, bias index), valid first.
static std::vector<std::pair<int, int>> axis_keys(const Axis& a, int x) {
  const int g = x % a.d, xi = x / a.d;
  int lg = 0;
  for (int y = g; y < a.L; y += a.d) ++lg;
  std::vector<std::pair<int, int>> out;
  if (a.causal) {
    for (int ki = std::max(xi - a.k + 1, 0); ki <= xi; ++ki)
      out.push_back({ki * a.d + g, ki - xi + a.k - 1});
    return out;
  }
  int start = xi - a.k / 2;
  if (start + a.k > lg) start = lg - a.k;
  if (start < 0) start = 0;
  for (int t = 0; t < a.k; ++t) out.push_back({(start + t) * a.d + g, start + t - xi + a.k - 1});
  return out;
}

struct Neighbor {
  int64_t key;
  int bias;
  int slot;
};

struct Geometry {
  std::vector<Axis> axes;  // right-aligned to 3
  int64_t n;
  int window, rsize;
  std::vector<std::vector<Neighbor>> nb;  // per token
  explicit Geometry(const std::vector<Axis>& in) {
    axes.assign(3 - in.size(), Axis{1, 1, 1, false});
    axes.insert(axes.end(), in.begin(), in.end());
    n = 1;
    window = 1;
    rsize = 1;
    for (auto& a : axes) {
      n *= a.L;
      window *= a.k;
      rsize *= 2 * a.k - 1;
    }
    nb.resize(n);
    for (int x0 = 0; x0 < axes[0].L; ++x0)
      for (int x1 = 0; x1 < axes[1].L; ++x1)
        for (int x2 = 0; x2 < axes[2].L; ++x2) {
          const auto a0 = axis_keys(axes[0], x0), a1 = axis_keys(axes[1], x1),
                     a2 = axis_keys(axes[2], x2);
          auto& list = nb[(int64_t(x0) * axes[1].L + x1) * axes[2].L + x2];
          for (size_t t0 = 0; t0 < a0.size(); ++t0)
            for (size_t t1 = 0; t1 < a1.size(); ++t1)
              for (size_t t2 = 0; t2 < a2.size(); ++t2)
                list.push_back(
                    {(int64_t(a0[t0].first) * axes[1].L + a1[t1].first) * axes[2].L +
                         a2[t2].first,
                     (a0[t0].second * (2 * axes[1].k - 1) + a1[t1].second) * (2 * axes[2].k - 1) +
                         a2[t2].second,
                     int((t0 * axes[1].k + t1) * axes[2].k + t2)});
        }
  }
};

template <typename T>
static std::vector<T> random_tensor(size_t n, std::mt19937& rng, float lo = -1.f, float hi = 1.f) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = na::from_f<T>(u(rng));
  return v;
}
template <typename T>
static std::vector<double> to_double(const std::vector<T>& v) {
  std::vector<double> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = na::to_f(v[i]);
  return o;
}

struct Tol {
  double atol, rtol;
};

template <typename T>
static void compare(const char* what, const std::string& tag, const std::vector<T>& got,
                    const std::vector<double>& want, Tol tol) {
  double worst = 0.0;
  int64_t bad = -1;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = na::to_f(got[i]), w = want[i];
    if (std::isinf(w) || std::isinf(g)) {
      if (!(std::isinf(w) && std::isinf(g) && (w < 0) == (g < 0)) && bad < 0) bad = i;
      continue;
    }
    const double err = std::fabs(g - w);
    if (!(err <= tol.atol + tol.rtol * std::fabs(w))) {  // also catches NaN
      if (bad < 0) bad = i;
    }
    if (err > worst || std::isnan(err)) worst = std::isnan(err) ? INFINITY : err;
  }
  if (bad >= 0) {
    ++g_failures;
    std::printf("FAIL %-10s %s  first bad index %lld got %g want %g (max err %g)\n", what,
                tag.c_str(), (long long)bad, (double)na::to_f(got[bad]), want[bad], worst);
  } else {
    std::printf("ok   %-10s %s  max err %.3g\n", what, tag.c_str(), worst);
  }
}

struct Config {
  std::vector<Axis> axes;
  int batch, heads, dim;
  bool rpb;
  size_t smem_budget;
};

template <typename T>
static void run_config(const Config& c, Tol tol, const char* dtype, uint32_t seed) {
  std::mt19937 rng(seed);
  const Geometry geo(c.axes);
  const int64_t bh = int64_t(c.batch) * c.heads, n = geo.n, D = c.dim, W = geo.window;
  const int64_t elems = bh * n * D;
  std::vector<int64_t> L, K, Dil;
  std::vector<bool> causal_v;
  std::string tag = std::string(dtype) + " L=";
  for (auto& a : c.axes) {
    L.push_back(a.L);
    K.push_back(a.k);
    Dil.push_back(a.d);
    causal_v.push_back(a.causal);
    tag += std::to_string(a.L) + "/k" + std::to_string(a.k) + "/d" + std::to_string(a.d) +
           (a.causal ? "c " : " ");
  }
  tag += "B" + std::to_string(c.batch) + "h" + std::to_string(c.heads) + " D=" +
         std::to_string(c.dim) + (c.rpb ? " rpb" : "") + " smem=" + std::to_string(c.smem_budget);
  bool causal_arr[3] = {false, false, false};
  for (size_t a = 0; a < causal_v.size(); ++a) causal_arr[a] = causal_v[a];
  const float scale = 1.f / std::sqrt(float(D));
  const na::Problem p = na::make_problem(int(c.axes.size()), c.batch, c.heads, c.dim, L.data(),
                                         K.data(), Dil.data(), causal_arr, scale, c.rpb);

  auto q = random_tensor<T>(elems, rng), k = random_tensor<T>(elems, rng),
       v = random_tensor<T>(elems, rng), dout = random_tensor<T>(elems, rng);
  auto rpb = random_tensor<T>(c.rpb ? c.heads * geo.rsize : 0, rng);
  auto qd = to_double(q), kd = to_double(k), vd = to_double(v), dod = to_double(dout),
       rpbd = to_double(rpb);

  // Reference: fused forward + backward.
  std::vector<double> out_r(elems), lse_r(bh * n), dq_r(elems, 0), dk_r(elems, 0), dv_r(elems, 0),
      drpb_r(rpb.size(), 0);
  for (int64_t b = 0; b < bh; ++b) {
    const int head = int(b % c.heads);
    for (int64_t i = 0; i < n; ++i) {
      const auto& list = geo.nb[i];
      std::vector<double> s(list.size()), pr(list.size()), dp(list.size());
      double mx = -INFINITY;
      for (size_t j = 0; j < list.size(); ++j) {
        double acc = 0;
        for (int e = 0; e < D; ++e) acc += qd[(b * n + i) * D + e] * kd[(b * n + list[j].key) * D + e];
        s[j] = acc * scale + (c.rpb ? rpbd[head * geo.rsize + list[j].bias] : 0.0);
        mx = std::max(mx, s[j]);
      }
      double sum = 0;
      for (size_t j = 0; j < list.size(); ++j) sum += (pr[j] = std::exp(s[j] - mx));
      lse_r[b * n + i] = mx + std::log(sum);
      double delta = 0;
      for (size_t j = 0; j < list.size(); ++j) {
        pr[j] /= sum;
        double acc = 0;
        for (int e = 0; e < D; ++e) {
          out_r[(b * n + i) * D + e] += pr[j] * vd[(b * n + list[j].key) * D + e];
          acc += dod[(b * n + i) * D + e] * vd[(b * n + list[j].key) * D + e];
        }
        dp[j] = acc;
        delta += pr[j] * acc;
      }
      for (size_t j = 0; j < list.size(); ++j) {
        const double ds = pr[j] * (dp[j] - delta);
        const int64_t kr = b * n + list[j].key;
        for (int e = 0; e < D; ++e) {
          dq_r[(b * n + i) * D + e] += scale * ds * kd[kr * D + e];
          dk_r[kr * D + e] += scale * ds * qd[(b * n + i) * D + e];
          dv_r[kr * D + e] += pr[j] * dod[(b * n + i) * D + e];
        }
        if (c.rpb) drpb_r[head * geo.rsize + list[j].bias] += ds;
      }
    }
  }

  std::vector<T> out(elems, na::from_f<T>(NAN)), dq(elems, na::from_f<T>(NAN)),
      dk(elems, na::from_f<T>(NAN)), dv(elems, na::from_f<T>(NAN));
  std::vector<na::acc_t<T>> lse(bh * n, NAN), delta(bh * n, NAN), drpb(rpb.size(), 0.f);
  const T* rpb_ptr = c.rpb ? rpb.data() : nullptr;
  // double stages its queries in double: twice the float budget (the chunked case still chunks).
  const size_t smem_budget = c.smem_budget * (sizeof(na::acc_t<T>) / sizeof(float));
  const char* err = na::launch_fused_forward<T>(p, q.data(), k.data(), v.data(), rpb_ptr,
                                                out.data(), lse.data(), smem_budget, nullptr);
  if (err) {
    std::printf("FAIL forward launch: %s (%s)\n", err, tag.c_str());
    ++g_failures;
    return;
  }
  compare("out", tag, out, out_r, tol);
  compare("lse", tag, lse, lse_r, tol);
  na::launch_fused_backward<T>(p, dout.data(), q.data(), k.data(), v.data(), rpb_ptr, out.data(),
                               lse.data(), delta.data(), dq.data(), dk.data(), dv.data(),
                               c.rpb ? drpb.data() : nullptr, nullptr);
  Tol gtol{tol.atol * 2, tol.rtol * 2};
  compare("grad_q", tag, dq, dq_r, gtol);
  compare("grad_k", tag, dk, dk_r, gtol);
  compare("grad_v", tag, dv, dv_r, gtol);
  if (c.rpb) compare("grad_rpb", tag, drpb, drpb_r, Tol{gtol.atol * 4, gtol.rtol});

  // Unfused qk / av and their backwards (q not scaled; random attention weights / gradients).
  auto attn_in = random_tensor<T>(bh * n * W, rng, 0.f, 1.f);
  auto gattn_in = random_tensor<T>(bh * n * W, rng);
  auto ad = to_double(attn_in), gad = to_double(gattn_in);
  std::vector<double> qk_r(bh * n * W, -INFINITY), av_r(elems, 0), av_dattn_r(bh * n * W, 0),
      av_dv_r(elems, 0), qk_dq_r(elems, 0), qk_dk_r(elems, 0), qk_drpb_r(rpb.size(), 0);
  for (int64_t b = 0; b < bh; ++b) {
    const int head = int(b % c.heads);
    for (int64_t i = 0; i < n; ++i)
      for (const auto& nbr : geo.nb[i]) {
        const int64_t qr = b * n + i, kr = b * n + nbr.key, ar = qr * W + nbr.slot;
        double acc = 0, acc2 = 0;
        for (int e = 0; e < D; ++e) {
          acc += qd[qr * D + e] * kd[kr * D + e];
          acc2 += dod[qr * D + e] * vd[kr * D + e];
          av_r[qr * D + e] += ad[ar] * vd[kr * D + e];
          av_dv_r[kr * D + e] += ad[ar] * dod[qr * D + e];
          qk_dq_r[qr * D + e] += gad[ar] * kd[kr * D + e];
          qk_dk_r[kr * D + e] += gad[ar] * qd[qr * D + e];
        }
        qk_r[ar] = acc + (c.rpb ? rpbd[head * geo.rsize + nbr.bias] : 0.0);
        av_dattn_r[ar] = acc2;
        if (c.rpb) qk_drpb_r[head * geo.rsize + nbr.bias] += gad[ar];
      }
  }
  // Unused causal slots hold garbage in attn_in / gattn_in on purpose: kernels must ignore them.
  std::vector<T> qk(bh * n * W, na::from_f<T>(NAN)), av(elems, na::from_f<T>(NAN)),
      av_dattn(bh * n * W, na::from_f<T>(NAN)), av_dv(elems, na::from_f<T>(NAN)),
      qk_dq(elems, na::from_f<T>(NAN)), qk_dk(elems, na::from_f<T>(NAN));
  std::vector<na::acc_t<T>> qk_drpb(rpb.size(), 0.f);
  na::launch_qk<T>(p, q.data(), k.data(), rpb_ptr, qk.data(), nullptr);
  compare("qk", tag, qk, qk_r, tol);
  na::launch_qk_backward<T>(p, gattn_in.data(), q.data(), k.data(), qk_dq.data(), qk_dk.data(),
                            c.rpb ? qk_drpb.data() : nullptr, nullptr);
  compare("qk_dq", tag, qk_dq, qk_dq_r, gtol);
  compare("qk_dk", tag, qk_dk, qk_dk_r, gtol);
  if (c.rpb) compare("qk_drpb", tag, qk_drpb, qk_drpb_r, Tol{gtol.atol * 4, gtol.rtol});
  na::launch_av<T>(p, attn_in.data(), v.data(), av.data(), nullptr);
  compare("av", tag, av, av_r, tol);
  na::launch_av_backward<T>(p, dout.data(), attn_in.data(), v.data(), av_dattn.data(),
                            av_dv.data(), nullptr);
  compare("av_dattn", tag, av_dattn, av_dattn_r, gtol);
  compare("av_dv", tag, av_dv, av_dv_r, gtol);
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  check_inverse_rule();
  const size_t big = 96 * 1024;
  std::vector<Config> configs = {
      // 2-D, rpb, per-axis kernel sizes, head_dim 32 (vector path).
      {{{9, 3, 1, false}, {8, 5, 1, false}}, 1, 2, 32, true, big},
      // 2-D dilation (groups of unequal length), head_dim 20.
      {{{10, 3, 3, false}, {11, 3, 2, false}}, 2, 1, 20, true, big},
      // 2-D causal on one axis, even kernel on the other, odd head_dim, no rpb.
      {{{7, 3, 2, true}, {9, 4, 2, false}}, 1, 1, 3, false, big},
      // 2-D, union larger than the shared-memory budget: staged in chunks.
      {{{12, 5, 1, false}, {12, 5, 1, false}}, 1, 1, 32, true, 20000},
      // 2-D, k == L (full attention), two heads and two images.
      {{{5, 5, 1, false}, {5, 5, 1, false}}, 2, 2, 8, true, big},
      // 1-D, dilation, head_dim 64; 1-D causal with even kernel and dilation.
      {{{23, 5, 3, false}}, 1, 2, 64, true, big},
      {{{17, 4, 2, true}}, 1, 1, 16, false, big},
      // 3-D, multi-pass head_dim (136 > 4 lanes x 32), dilation on one axis.
      {{{4, 3, 1, false}, {6, 3, 2, false}, {5, 3, 1, false}}, 1, 1, 136, true, big},
      // 3-D causal on every axis, head_dim 72.
      {{{4, 2, 1, true}, {5, 3, 1, true}, {5, 3, 1, true}}, 1, 1, 72, false, big},
  };
  if (quick) configs.resize(3);
  uint32_t seed = 1;
  for (const auto& c : configs) {
    run_config<float>(c, Tol{2e-5, 2e-4}, "float", seed++);
    run_config<__half>(c, Tol{4e-3, 1e-2}, "half", seed++);
    run_config<__nv_bfloat16>(c, Tol{3e-2, 4e-2}, "bf16", seed++);
    run_config<double>(c, Tol{1e-13, 1e-12}, "double", seed++);
  }
  if (g_failures) {
    std::printf("%d FAILURES\n", g_failures);
    return 1;
  }
  std::printf("ALL OK\n");
  return 0;
}
