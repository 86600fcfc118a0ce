// fusionserve::paged_attention: attention over the paged KV pool on CPU, reading K/V in place.
//
// Query token t of sequence b sits at position i = seq_len - query_len + r and sees the keys [lo, hi) of its
// sequence: lo = i - window + 1 (0 without a window), hi = i + 1, widened to its bidirectional media run
// [run_start, run_end) when one is given, hi capped at seq_len (the torch reference's masks; the two ranges
// overlap at i, so the union is one interval). A work item is (up to kTileTokens query tokens of one
// sequence, a range of KV heads): the query heads of those KV heads (GQA) for each token are its rows. Keys
// are read through the block table a chunk at a time; every row takes the chunk's keys inside its interval,
// with an online softmax in fp32. Decode and prefill are one case (a decode tile is one token).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FS_AVX2 1
#include "vec_exp.h"
using fusionserve::exp256;
#endif

namespace {

constexpr int64_t kChunk = 32;  // keys per online-softmax step
constexpr int64_t kTileTokens = 16;  // query tokens of one sequence per work item (prefill chunks)

#ifdef FS_AVX2
inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
#endif

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t d = 0;
  float sum = 0.f;
#ifdef FS_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; d + 16 <= n; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
  }
  for (; d + 8 <= n; d += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
  sum = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// s[j] = scale * q . k[j] for j in [a, b)
inline void scores(const float* q, const float* const* k, int64_t a, int64_t b, int64_t n, float scale, float* s) {
  int64_t j = a;
#ifdef FS_AVX2
  if (n % 8 == 0) {
    const __m256 sc = _mm256_set1_ps(scale);
    for (; j + 8 <= b; j += 8) {  // 8 keys at once: 8 independent FMA chains, one 8-way reduction
      __m256 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t d = 0; d < n; d += 8) {
        const __m256 qd = _mm256_loadu_ps(q + d);
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k[j + i] + d), acc[i]);
      }
      const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
      const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
      const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
      _mm256_storeu_ps(s + j, _mm256_mul_ps(sum, sc));
    }
  }
#endif
  for (; j < b; ++j) s[j] = dot(q, k[j], n) * scale;
}

#ifdef FS_AVX2
// W vectors of y (8 W floats) = y * alpha + sum_j p[j] * x[j], kept in registers across the keys
template <int W>
inline void accumulate_block(float* y, __m256 alpha, const float* p, const float* const* x, int64_t num_x,
                             int64_t offset) {
  __m256 acc[W];
  for (int w = 0; w < W; ++w) acc[w] = _mm256_mul_ps(_mm256_loadu_ps(y + 8 * w), alpha);
  for (int64_t j = 0; j < num_x; ++j) {
    const __m256 pj = _mm256_set1_ps(p[j]);
    const float* xj = x[j] + offset;
    for (int w = 0; w < W; ++w) acc[w] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(xj + 8 * w), acc[w]);
  }
  for (int w = 0; w < W; ++w) _mm256_storeu_ps(y + 8 * w, acc[w]);
}
#endif

// y = y * alpha + sum_j p[j] * x[j]
inline void scale_and_accumulate(float* y, float alpha, const float* p, const float* const* x, int64_t num_x,
                                 int64_t n) {
  int64_t d = 0;
#ifdef FS_AVX2
  const __m256 a = _mm256_set1_ps(alpha);
  for (; d + 64 <= n; d += 64) accumulate_block<8>(y + d, a, p, x, num_x, d);
  for (; d + 8 <= n; d += 8) accumulate_block<1>(y + d, a, p, x, num_x, d);
#endif
  for (; d < n; ++d) {
    float acc = y[d] * alpha;
    for (int64_t j = 0; j < num_x; ++j) acc += p[j] * x[j][d];
    y[d] = acc;
  }
}

// s[j] = exp(s[j] - m); returns their sum
inline float exp_shifted(float* s, int64_t n, float m) {
  int64_t j = 0;
  float sum = 0.f;
#ifdef FS_AVX2
  __m256 acc = _mm256_setzero_ps();
  const __m256 mm = _mm256_set1_ps(m);
  for (; j + 8 <= n; j += 8) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), mm));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  return sum;
}

template <typename T>
inline void to_float(float* dst, const T* src, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
}

struct Tile {
  int64_t seq;
  int64_t first_token;  // in the step
  int64_t num_tokens;
  int64_t first_pos;  // position of its first token in the sequence
};

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const int32_t* tables,
            int64_t table_stride, const int32_t* seq_lens, const int64_t* run_start, const int64_t* run_end,
            const std::vector<Tile>& tiles, double scale_d, int64_t window, at::Tensor& out) {
  const int64_t num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t q_stride_t = q.stride(0), q_stride_h = q.stride(1);
  const int64_t o_stride_t = out.stride(0), o_stride_h = out.stride(1);
  // pool strides: [num_blocks, block_size, Hkv, D], rows of D contiguous
  const int64_t kb = k_cache.stride(0), ks = k_cache.stride(1), kh = k_cache.stride(2);
  const int64_t vb = v_cache.stride(0), vs = v_cache.stride(1), vh = v_cache.stride(2);
  const T* q_data = q.data_ptr<T>();
  const T* k_data = k_cache.data_ptr<T>();
  const T* v_data = v_cache.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  const float scale = static_cast<float>(scale_d);
  constexpr bool kFloat = std::is_same<T, float>::value;

  // a work item is one tile and a range of KV heads: all of them when there are enough tiles, so each item
  // streams whole [block_size, Hkv, D] blocks; split over the heads when there are few tiles (batch 1)
  const int64_t num_tiles = static_cast<int64_t>(tiles.size());
  const int64_t threads = at::get_num_threads();
  const int64_t splits =
      threads == 1 ? 1 : std::min(num_kv_heads, std::max<int64_t>(1, (2 * threads + num_tiles - 1) / num_tiles));
  const int64_t heads_per_item = (num_kv_heads + splits - 1) / splits;
  const int64_t num_items = num_tiles * splits;
  int64_t read_keys = 0, work_keys = 0;  // keys read (runs aside), and query-key pairs
  std::vector<int64_t> done(num_tiles + 1, 0);  // query-key pairs of the tiles before each
  for (int64_t i = 0; i < num_tiles; ++i) {
    const Tile& tile = tiles[i];
    const int64_t end_pos = tile.first_pos + tile.num_tokens;
    const int64_t span = window > 0 ? std::min(end_pos, window + tile.num_tokens - 1) : end_pos;
    read_keys += span, work_keys += span * tile.num_tokens;
    done[i + 1] = work_keys;
  }
  // the items in one contiguous range per thread, of equal work: a prefill chunk's tiles see more keys the later
  // they come (split by count, the thread with the second half of a causal chunk does three quarters of it);
  // a small step runs on one thread
  const int64_t num_groups = work_keys * num_heads * head_dim < (1 << 18) ? 1 : std::min(threads, num_items);
  std::vector<int64_t> bounds(num_groups + 1, num_items);  // group g: the items [bounds[g], bounds[g + 1])
  for (int64_t g = 0, item = 0; g < num_groups; ++g) {
    const int64_t target = work_keys * g / num_groups;  // the work before the group's first item
    auto before = [&](int64_t i) {  // the work before item i (a tile's items: equal shares of its work)
      const int64_t t = i / splits;
      return done[t] + (done[t + 1] - done[t]) * (i % splits) / splits;
    };
    while (item < num_items && before(item) < target) ++item;
    bounds[g] = item;
  }
  // fp32 rows are read in place while the step's K/V fit in the caches; past that each chunk is copied into a
  // per-thread buffer in address order (a sequential stream through memory: 1.1-1.25x at batch 32, context
  // 256-1024, one thread); half pools are always converted that way
  const int64_t kv_bytes = 2 * read_keys * num_kv_heads * head_dim * static_cast<int64_t>(sizeof(float));
  const bool direct = kFloat && kv_bytes < (int64_t(8) << 20);

  at::parallel_for(0, num_groups, 1, [&](int64_t group_begin, int64_t group_end) {
    const int64_t max_rows = kTileTokens * heads_per_item * group;
    std::vector<float> qf(max_rows * head_dim), acc(max_rows * head_dim), m(max_rows), l(max_rows);
    std::vector<int64_t> lo(max_rows), hi(max_rows);
    std::vector<float> kbuf(direct ? 0 : heads_per_item * kChunk * head_dim);
    std::vector<float> vbuf(direct ? 0 : heads_per_item * kChunk * head_dim);
    std::vector<const float*> krow(heads_per_item * kChunk), vrow(heads_per_item * kChunk);  // [head][key]
    float s[kChunk];
    for (int64_t item = bounds[group_begin]; item < bounds[group_end]; ++item) {
      const Tile& tile = tiles[item / splits];
      const int64_t h0 = (item % splits) * heads_per_item, h1 = std::min(num_kv_heads, h0 + heads_per_item);
      if (h0 >= h1) continue;
      const int64_t num_item_heads = h1 - h0, rows_per_token = num_item_heads * group;
      const int64_t seq_len = seq_lens[tile.seq];
      const int32_t* table = tables + tile.seq * table_stride;
      const int64_t num_rows = tile.num_tokens * rows_per_token;
      int64_t first = seq_len, last = 0;  // the keys any row sees: [first, last)
      // rows: (token, kv head, query head of its group)
      for (int64_t r = 0; r < num_rows; ++r) {
        const int64_t t = r / rows_per_token, head = h0 * group + r % rows_per_token;
        const int64_t token = tile.first_token + t, pos = tile.first_pos + t;
        int64_t a = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0, b = pos + 1;
        if (run_start != nullptr) {
          a = std::min(a, run_start[token]);
          b = std::max(b, run_end[token]);
        }
        lo[r] = a, hi[r] = std::min(b, seq_len);
        first = std::min(first, lo[r]), last = std::max(last, hi[r]);
        to_float(qf.data() + r * head_dim, q_data + token * q_stride_t + head * q_stride_h, head_dim);
        std::fill_n(acc.data() + r * head_dim, head_dim, 0.f);
        m[r] = -std::numeric_limits<float>::infinity(), l[r] = 0.f;
      }
      for (int64_t c = first; c < last; c += kChunk) {
        const int64_t n = std::min(kChunk, last - c);
        int64_t block = c / block_size, slot = c % block_size;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t page = table[block];
          for (int64_t hl = 0; hl < num_item_heads; ++hl) {
            const T* kp = k_data + page * kb + slot * ks + (h0 + hl) * kh;
            const T* vp = v_data + page * vb + slot * vs + (h0 + hl) * vh;
            const int64_t at = hl * kChunk + j;
            if (direct) {
              krow[at] = reinterpret_cast<const float*>(kp), vrow[at] = reinterpret_cast<const float*>(vp);
            } else {
              float* kf = kbuf.data() + at * head_dim;
              float* vf = vbuf.data() + at * head_dim;
              to_float(kf, kp, head_dim), to_float(vf, vp, head_dim);
              krow[at] = kf, vrow[at] = vf;
            }
          }
          if (++slot == block_size) slot = 0, ++block;
        }
        for (int64_t r = 0; r < num_rows; ++r) {
          const int64_t a = std::max(lo[r], c) - c, b = std::min(hi[r], c + n) - c;
          if (a >= b) continue;
          const int64_t hl = (r % rows_per_token) / group;
          const float* const* kr = krow.data() + hl * kChunk;
          const float* const* vr = vrow.data() + hl * kChunk;
          scores(qf.data() + r * head_dim, kr, a, b, head_dim, scale, s);
          const float chunk_max = *std::max_element(s + a, s + b);
          const float m_new = std::max(m[r], chunk_max);
          const float alpha = std::exp(m[r] - m_new);  // 0 for the first chunk (m = -inf)
          l[r] = l[r] * alpha + exp_shifted(s + a, b - a, m_new);
          m[r] = m_new;
          scale_and_accumulate(acc.data() + r * head_dim, alpha, s + a, vr + a, b - a, head_dim);
        }
      }
      for (int64_t r = 0; r < num_rows; ++r) {
        const int64_t t = r / rows_per_token, head = h0 * group + r % rows_per_token;
        const float inv = 1.f / l[r];
        T* o = out_data + (tile.first_token + t) * o_stride_t + head * o_stride_h;
        const float* ar = acc.data() + r * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) o[d] = static_cast<T>(ar[d] * inv);
      }
    }
  });
}

void paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q,
                     const c10::optional<at::Tensor>& run_start, const c10::optional<at::Tensor>& run_end,
                     double scale, int64_t sliding_window, at::Tensor& out) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "paged_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_attention: q [T, H, D], k_cache / v_cache [num_blocks, block_size, Hkv, D]");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0,
              "paged_attention: head dims differ or H is not a multiple of Hkv");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "paged_attention: q, the pools and out must share a dtype");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "paged_attention: the head dim must be contiguous");
  TORCH_CHECK(out.sizes() == q.sizes(), "paged_attention: out must be shaped like q");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  cu_seqlens_q.scalar_type() == at::kInt && block_tables.is_contiguous() &&
                  seq_lens.is_contiguous() && cu_seqlens_q.is_contiguous(),
              "paged_attention: block_tables, seq_lens, cu_seqlens_q: contiguous int32");
  TORCH_CHECK(run_start.has_value() == run_end.has_value(), "paged_attention: run_start and run_end together");
  const int64_t* rs = nullptr;
  const int64_t* re = nullptr;
  if (run_start.has_value()) {
    TORCH_CHECK(run_start->scalar_type() == at::kLong && run_end->scalar_type() == at::kLong &&
                    run_start->is_contiguous() && run_end->is_contiguous() && run_start->numel() == q.size(0),
                "paged_attention: run_start / run_end: contiguous int64 [T]");
    rs = run_start->data_ptr<int64_t>(), re = run_end->data_ptr<int64_t>();
  }
  const int64_t num_seqs = seq_lens.numel();
  TORCH_CHECK(cu_seqlens_q.numel() == num_seqs + 1 && block_tables.size(0) == num_seqs,
              "paged_attention: one block table row and one cu_seqlens_q step per sequence");
  const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  TORCH_CHECK(cu[num_seqs] == q.size(0), "paged_attention: cu_seqlens_q does not end at q's token count");
  const int64_t table_width = block_tables.size(1), block_size = k_cache.size(1);
  std::vector<Tile> tiles;
  tiles.reserve(num_seqs);
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t query_len = cu[b + 1] - cu[b];
    TORCH_CHECK(query_len > 0 && query_len <= lens[b] && lens[b] <= table_width * block_size,
                "paged_attention: sequence ", b, " has query_len ", query_len, " seq_len ", lens[b]);
    for (int64_t t = 0; t < query_len; t += kTileTokens) {
      tiles.push_back({b, cu[b] + t, std::min(kTileTokens, query_len - t), lens[b] - query_len + t});
    }
  }
  if (tiles.empty()) return;
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  switch (q.scalar_type()) {
    case at::kFloat:
      attend<float>(q, k_cache, v_cache, tables, table_width, lens, rs, re, tiles, scale, sliding_window, out);
      break;
    case at::kBFloat16:
      attend<c10::BFloat16>(q, k_cache, v_cache, tables, table_width, lens, rs, re, tiles, scale, sliding_window,
                            out);
      break;
    case at::kHalf:
      attend<c10::Half>(q, k_cache, v_cache, tables, table_width, lens, rs, re, tiles, scale, sliding_window, out);
      break;
    default:
      TORCH_CHECK(false, "paged_attention: float32, bfloat16 or float16, not ", q.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(fusionserve, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "Tensor cu_seqlens_q, Tensor? run_start, Tensor? run_end, float scale, int sliding_window, "
        "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fusionserve, CPU, m) { m.impl("paged_attention", &paged_attention); }
