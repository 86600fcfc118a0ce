// fusionserve::small_linear: y = x W^T + b for a few rows of x (float32, CPU), the linear of a small decode step.
//
// With 1-8 rows a linear is a walk over its weight: every weight element is used once per row, so the time is
// the time to stream W from memory (the benchmark Fuyu's 100 MB of linears do not fit any cache). MKL's sgemm
// and oneDNN run such shapes at about half the bandwidth two cores reach (their blocking is made for many
// rows); here each thread takes a contiguous range of output features, reads 4 weight rows at a time and
// multiplies them with every input row (4 at a time, from L1), so W is read once, in order, by both cores.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FS_AVX2 1
#endif

namespace {

constexpr int kOutTile = 4;         // weight rows (output features) per inner step (sum4 reduces four)
constexpr int64_t kRowTile = 4;     // input rows per inner step
constexpr int64_t kBlockBytes = 64 << 10;  // weight rows that stay in L2 while every row group passes over them

#ifdef FS_AVX2
// the sums of a[0], ..., a[3], as one vector of four
inline __m128 sum4(const __m256* a) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
#endif

// rows [0, M) of x (M <= kRowTile) times weight rows [n0, n1) into y; ldx / ldy: row strides
template <int M>
void tile(const float* x, int64_t ldx, const float* w, int64_t K, const float* bias, float* y, int64_t ldy,
          int64_t n0, int64_t n1) {
  int64_t n = n0;
#ifdef FS_AVX2
  for (; n + kOutTile <= n1; n += kOutTile) {
    __m256 acc[M][kOutTile];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < kOutTile; ++j) acc[m][j] = _mm256_setzero_ps();
    const float* wn = w + n * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      __m256 wv[kOutTile];
      for (int j = 0; j < kOutTile; ++j) wv[j] = _mm256_loadu_ps(wn + j * K + k);
      for (int m = 0; m < M; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
        for (int j = 0; j < kOutTile; ++j) acc[m][j] = _mm256_fmadd_ps(wv[j], xv, acc[m][j]);
      }
    }
    for (int m = 0; m < M; ++m) {
      alignas(16) float sums[kOutTile];
      _mm_store_ps(sums, sum4(acc[m]));
      for (int j = 0; j < kOutTile; ++j) {
        float s = sums[j];
        for (int64_t kk = k; kk < K; ++kk) s += wn[j * K + kk] * x[m * ldx + kk];
        y[m * ldy + n + j] = s + (bias ? bias[n + j] : 0.f);
      }
    }
  }
#endif
  for (; n < n1; ++n) {
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += w[n * K + k] * x[m * ldx + k];
      y[m * ldy + n] = s + (bias ? bias[n] : 0.f);
    }
  }
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "small_linear: x [M, K] and weight [N, K], got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "small_linear: float32 only");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "small_linear: CPU tensors only");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat,
                "small_linear: bias [N] float32, got ", bias->sizes());
    bc = bias->contiguous();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (N + kOutTile - 1) / kOutTile;
  const int64_t block_tiles = std::max<int64_t>(1, kBlockBytes / (K * static_cast<int64_t>(sizeof(float)) * kOutTile));
  at::parallel_for(0, tiles, block_tiles, [&](int64_t begin, int64_t end) {
    const int64_t stop = std::min(N, end * kOutTile);
    for (int64_t nb = begin * kOutTile; nb < stop; nb += block_tiles * kOutTile) {
      const int64_t ne = std::min(stop, nb + block_tiles * kOutTile);
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        const float* xm = xp + m0 * K;
        float* ym = yp + m0 * N;
        switch (std::min(kRowTile, M - m0)) {
          case 1: tile<1>(xm, K, wp, K, bp, ym, N, nb, ne); break;
          case 2: tile<2>(xm, K, wp, K, bp, ym, N, nb, ne); break;
          case 3: tile<3>(xm, K, wp, K, bp, ym, N, nb, ne); break;
          default: tile<4>(xm, K, wp, K, bp, ym, N, nb, ne); break;
        }
      }
    }
  });
  return y;
}

}  // namespace

// a fragment: the paged attention library defines the namespace
TORCH_LIBRARY_FRAGMENT(fusionserve, m) { m.def("small_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(fusionserve, CPU, m) { m.impl("small_linear", &small_linear); }
