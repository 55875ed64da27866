// Native CPU attention over the paged KV cache: decode reads K/V blocks where they are.
//
// Cache layout (shared with every backend):
//   k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous
//   slot = block_id * block_size + offset_in_block
//
// One work item is (sequence, range of KV heads, slice of at most kMaxGroup query heads
// of each group, context partition). It walks the sequence's block table in chunks of
// kChunkTokens tokens; for each KV head of its range it scores the chunk's keys against
// that head's queries, updates an online softmax (running max and sum, fp32) and
// accumulates the weighted values in fp32. An item takes every KV head of a token row
// when there are enough items for the threads (each block's bytes are read in one
// sweep), and fewer heads only when there are not. Keys and values are read in the
// cache's dtype; bf16 rows are widened to fp32 chunk by chunk (a shift, no rounding),
// never the whole context. Queries are the cache's dtype or fp32 (a bf16 cache under
// fp32 compute). Items run on torch's intra-op threads, longest first, taken from a
// shared counter so that ragged contexts balance. When there are too few items for the
// threads (small batches, long contexts), each context is also split into partitions
// whose partial results (max, sum, accumulator) are merged afterwards.
//
// This file is compiled once per instruction set: CPU_CAPABILITY_AVX2 (AVX2 + FMA) or
// CPU_CAPABILITY_AVX512 (AVX-512 F/BW/VL/DQ). at::vec::Vectorized<float> is 8 or 16 lanes.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace twolane {
namespace {

using Vec = at::vec::Vectorized<float>;
using BF16 = c10::BFloat16;

constexpr int kLanes = Vec::size();
constexpr int kChunkTokens = 32;  // keys scored per online-softmax update
constexpr int kMaxGroup = 8;      // query heads one item serves (one KV head's group, or a slice)
constexpr int kMaxTileVecs = 8;   // accumulator vectors held in registers at once
// Contexts shorter than this are never split: below it the merge costs more than it saves.
constexpr int64_t kMinPartitionTokens = 256;
constexpr int kItemsPerThread = 4;  // enough items per thread for the counter to balance
constexpr int kPrefetchTokens = 8;  // rows of the next chunk prefetched per sub-chunk

#if defined(CPU_CAPABILITY_AVX512)
const char* const kIsa = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
const char* const kIsa = "avx2";
#else
const char* const kIsa = "default";
#endif

inline float hsum(Vec v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 x = v;
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
#else
  float lanes[kLanes];
  v.store(lanes);
  float total = 0.f;
  for (int i = 0; i < kLanes; ++i) total += lanes[i];
  return total;
#endif
}

// bf16 -> fp32 is exact: the 16 bits become the high half of the fp32 word.
inline void widen_row(const BF16* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  for (; i + 16 <= n; i += 16) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16);
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(wide));
  }
#endif
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  for (; i + 8 <= n; i += 8) {
    __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16);
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(wide));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void widen_row(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

inline void prefetch_row(const void* row, int64_t bytes) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
#else
  (void)row;
  (void)bytes;
#endif
}

// scores[g][t] = q[g] . k[t] for `num_keys` keys, G queries; TT keys at a time keep
// G * TT independent FMA chains in flight.
template <int G, int TT>
void score_keys(const float* q, int64_t head_dim, const float* const* keys, int num_keys,
                float (*scores)[kChunkTokens]) {
  int t = 0;
  for (; t + TT <= num_keys; t += TT) {
    Vec acc[TT][G];
    for (int j = 0; j < TT; ++j)
      for (int g = 0; g < G; ++g) acc[j][g] = Vec(0.f);
    for (int64_t d = 0; d < head_dim; d += kLanes) {
      Vec k[TT];
      for (int j = 0; j < TT; ++j) k[j] = Vec::loadu(keys[t + j] + d);
      for (int g = 0; g < G; ++g) {
        Vec qv = Vec::loadu(q + g * head_dim + d);
        for (int j = 0; j < TT; ++j) acc[j][g] = at::vec::fmadd(qv, k[j], acc[j][g]);
      }
    }
    for (int j = 0; j < TT; ++j)
      for (int g = 0; g < G; ++g) scores[g][t + j] = hsum(acc[j][g]);
  }
  for (; t < num_keys; ++t) {
    Vec acc[G];
    for (int g = 0; g < G; ++g) acc[g] = Vec(0.f);
    for (int64_t d = 0; d < head_dim; d += kLanes) {
      Vec k = Vec::loadu(keys[t] + d);
      for (int g = 0; g < G; ++g) acc[g] = at::vec::fmadd(Vec::loadu(q + g * head_dim + d), k, acc[g]);
    }
    for (int g = 0; g < G; ++g) scores[g][t] = hsum(acc[g]);
  }
}

void score_chunk(int group, const float* q, int64_t head_dim, const float* const* keys,
                 int num_keys, float (*scores)[kChunkTokens]) {
  switch (group) {
    case 1: return score_keys<1, 4>(q, head_dim, keys, num_keys, scores);
    case 2: return score_keys<2, 4>(q, head_dim, keys, num_keys, scores);
    case 3: return score_keys<3, 2>(q, head_dim, keys, num_keys, scores);
    case 4: return score_keys<4, 2>(q, head_dim, keys, num_keys, scores);
    case 5: return score_keys<5, 1>(q, head_dim, keys, num_keys, scores);
    case 6: return score_keys<6, 1>(q, head_dim, keys, num_keys, scores);
    case 7: return score_keys<7, 1>(q, head_dim, keys, num_keys, scores);
    default: return score_keys<8, 1>(q, head_dim, keys, num_keys, scores);
  }
}

// acc[d0 : d0 + NT * kLanes] += sum_t p[t] * values[t][same range], in registers.
template <int NT>
void accumulate_tile(float* acc, const float* p, const float* const* values, int num_values,
                     int64_t d0) {
  Vec a[NT];
  for (int j = 0; j < NT; ++j) a[j] = Vec::loadu(acc + d0 + j * kLanes);
  for (int t = 0; t < num_values; ++t) {
    Vec pt(p[t]);
    const float* v = values[t] + d0;
    for (int j = 0; j < NT; ++j) a[j] = at::vec::fmadd(pt, Vec::loadu(v + j * kLanes), a[j]);
  }
  for (int j = 0; j < NT; ++j) a[j].store(acc + d0 + j * kLanes);
}

void accumulate_values(float* acc, const float* p, const float* const* values, int num_values,
                       int64_t head_dim) {
  int64_t d0 = 0;
  while (d0 < head_dim) {
    int64_t vecs = std::min<int64_t>(kMaxTileVecs, (head_dim - d0) / kLanes);
    switch (vecs) {
      case 1: accumulate_tile<1>(acc, p, values, num_values, d0); break;
      case 2: accumulate_tile<2>(acc, p, values, num_values, d0); break;
      case 3: accumulate_tile<3>(acc, p, values, num_values, d0); break;
      case 4: accumulate_tile<4>(acc, p, values, num_values, d0); break;
      case 5: accumulate_tile<5>(acc, p, values, num_values, d0); break;
      case 6: accumulate_tile<6>(acc, p, values, num_values, d0); break;
      case 7: accumulate_tile<7>(acc, p, values, num_values, d0); break;
      default: accumulate_tile<8>(acc, p, values, num_values, d0); break;
    }
    d0 += vecs * kLanes;
  }
}

inline void scale_row(float* row, float factor, int64_t n) {
  Vec f(factor);
  for (int64_t d = 0; d < n; d += kLanes) (Vec::loadu(row + d) * f).store(row + d);
}

// Sets scores[0 : n] to exp(scores - max) (lanes past n to 0) and returns their sum.
float exp_and_sum(float* scores, int n, float max) {
  Vec m(max);
  Vec total(0.f);
  for (int t = 0; t < kChunkTokens; t += kLanes) {
    Vec s = Vec::loadu(scores + t);
    Vec e = (s - m).exp();
    if (t + kLanes > n) {
      // Lanes past the chunk's end hold stale values: zero them.
      float lanes[kLanes];
      e.store(lanes);
      for (int i = std::max(0, n - t); i < kLanes; ++i) lanes[i] = 0.f;
      e = Vec::loadu(lanes);
    }
    e.store(scores + t);
    total = total + e;
    if (t + kLanes >= n) break;
  }
  return hsum(total);
}

// One item's geometry, in elements of the cache.
struct CacheView {
  int64_t block_size;
  int64_t token_stride;  // num_kv_heads * head_dim
  int64_t block_stride;  // block_size * token_stride
  int64_t num_blocks;
};

struct Item {
  int64_t seq;
  int64_t kv_head0;      // KV heads [kv_head0, kv_head0 + num_kv_heads): whole rows together
  int64_t num_kv_heads;
  int64_t g0;            // query heads g0 .. g0 + group - 1 of each KV head's group
  int64_t group;         // (<= kMaxGroup)
  int64_t start;         // context positions [start, end)
  int64_t end;
  int64_t partial;       // first partial-result slot, or -1: the item is its output's only part
};

// Per-thread buffers, reused across items; sized for every KV head of a row.
struct Scratch {
  Scratch(int64_t num_kv_heads, int64_t head_dim)
      : q(num_kv_heads * kMaxGroup * head_dim), acc(num_kv_heads * kMaxGroup * head_dim),
        max(num_kv_heads * kMaxGroup), sum(num_kv_heads * kMaxGroup),
        values(kChunkTokens * head_dim) {}
  std::vector<float> q, acc, max, sum;  // [kv head][g][head_dim], [kv head][g]
  std::vector<float> values;            // a chunk's value rows of one head, widened
  alignas(64) float scores[kMaxGroup][kChunkTokens];
};

// Scores of one head's G queries against a chunk's keys, into s.scores. Keys of another
// dtype are widened into `widened` first (once per key, whatever G).
template <typename T>
void score_head(int group, const float* q, int64_t head_dim, const T* const* keys, int n,
                int64_t head_offset, float* widened, float (*scores)[kChunkTokens]) {
  const float* rows[kChunkTokens];
  for (int t = 0; t < n; ++t) {
    if constexpr (std::is_same_v<T, float>) {
      rows[t] = keys[t] + head_offset;
    } else {
      widen_row(keys[t] + head_offset, widened + t * head_dim, head_dim);
      rows[t] = widened + t * head_dim;
    }
  }
  score_chunk(group, q, head_dim, rows, n, scores);
}

// Attend one item: fills s.max, s.sum and s.acc (unnormalised) for its query heads.
// Returns false when the block table points outside the cache.
// T is the cache's element type, Q the query's (the cache's, or float).
template <typename T, typename Q>
bool attend_item(const Item& item, const Q* query_row, int64_t query_head_stride,
                 int64_t head_dim, int64_t full_group, float scale, const T* k_cache,
                 const T* v_cache, const int32_t* table, const CacheView& cache, Scratch& s) {
  const int group = static_cast<int>(item.group);
  const int64_t num_rows = item.num_kv_heads * group;  // (kv head, g) pairs of the item
  for (int64_t h = 0; h < item.num_kv_heads; ++h) {
    for (int g = 0; g < group; ++g) {
      const int64_t head = (item.kv_head0 + h) * full_group + item.g0 + g;
      const Q* q = query_row + head * query_head_stride;
      float* dst = s.q.data() + (h * group + g) * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<float>(q[d]) * scale;
    }
  }
  std::fill(s.max.begin(), s.max.begin() + num_rows, -std::numeric_limits<float>::infinity());
  std::fill(s.sum.begin(), s.sum.begin() + num_rows, 0.f);
  std::fill(s.acc.begin(), s.acc.begin() + num_rows * head_dim, 0.f);
  const int64_t head_bytes = head_dim * static_cast<int64_t>(sizeof(T));
  const T* next_k[kChunkTokens];
  const T* next_v[kChunkTokens];
  // Row addresses of `n` consecutive positions from `start` (at the item's first KV head):
  // one division per chunk, not per token, and one table read per block.
  auto gather = [&](int64_t start, int n) -> bool {
    int64_t block_index = start / cache.block_size;
    int64_t offset = start - block_index * cache.block_size;
    int64_t base = 0;
    for (int t = 0; t < n; ++t) {
      if (t == 0 || offset == cache.block_size) {
        if (offset == cache.block_size) {
          ++block_index;
          offset = 0;
        }
        const int64_t block = table[block_index];
        if (block < 0 || block >= cache.num_blocks) return false;
        base = block * cache.block_stride + item.kv_head0 * head_dim;
      }
      next_k[t] = k_cache + base + offset * cache.token_stride;
      next_v[t] = v_cache + base + offset * cache.token_stride;
      ++offset;
    }
    return true;
  };
  int n = static_cast<int>(std::min<int64_t>(kChunkTokens, item.end - item.start));
  if (!gather(item.start, n)) return false;
  for (int64_t c0 = item.start; c0 < item.end;) {
    const T* keys[kChunkTokens];
    const T* values[kChunkTokens];
    std::copy(next_k, next_k + n, keys);
    std::copy(next_v, next_v + n, values);
    const int64_t c1 = c0 + n;
    const int next_n = static_cast<int>(std::min<int64_t>(kChunkTokens, item.end - c1));
    if (next_n > 0 && !gather(c1, next_n)) return false;
    for (int64_t h = 0; h < item.num_kv_heads; ++h) {
      const int64_t head_offset = h * head_dim;
      float* q = s.q.data() + h * group * head_dim;
      // Score in sub-chunks, each preceded by prefetches of the next chunk's rows of this
      // head: spread out, they overlap the arithmetic instead of queueing in one burst.
      for (int sub = 0; sub < n; sub += kPrefetchTokens) {
        const int m = std::min(kPrefetchTokens, n - sub);
        for (int t = sub; t < std::min(sub + kPrefetchTokens, next_n); ++t) {
          prefetch_row(next_k[t] + head_offset, head_bytes);
          prefetch_row(next_v[t] + head_offset, head_bytes);
        }
        score_head<T>(group, q, head_dim, keys + sub, m, head_offset,
                      s.values.data() + sub * head_dim,
                      reinterpret_cast<float(*)[kChunkTokens]>(&s.scores[0][sub]));
      }
      for (int t = n; t < next_n; ++t) {  // a next chunk longer than this one
        prefetch_row(next_k[t] + head_offset, head_bytes);
        prefetch_row(next_v[t] + head_offset, head_bytes);
      }
      const float* value_rows[kChunkTokens];
      for (int t = 0; t < n; ++t) {
        if constexpr (std::is_same_v<T, float>) {
          value_rows[t] = values[t] + head_offset;
        } else {
          widen_row(values[t] + head_offset, s.values.data() + t * head_dim, head_dim);
          value_rows[t] = s.values.data() + t * head_dim;
        }
      }
      for (int g = 0; g < group; ++g) {
        const int64_t r = h * group + g;
        float* sc = s.scores[g];
        const float chunk_max = *std::max_element(sc, sc + n);
        const float new_max = std::max(s.max[r], chunk_max);
        float* acc = s.acc.data() + r * head_dim;
        if (new_max > s.max[r]) {
          if (s.sum[r] > 0.f) {
            const float rescale = std::exp(s.max[r] - new_max);
            s.sum[r] *= rescale;
            scale_row(acc, rescale, head_dim);
          }
          s.max[r] = new_max;
        }
        s.sum[r] += exp_and_sum(sc, n, new_max);
        accumulate_values(acc, sc, value_rows, n, head_dim);
      }
    }
    c0 = c1;
    n = next_n;
  }
  return true;
}

template <typename T>
void write_output(T* out, const float* acc, float sum, int64_t head_dim) {
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int64_t d = 0; d < head_dim; ++d) out[d] = static_cast<T>(acc[d] * inv);
}

// Split each context into partitions only when there are too few items for the threads.
int64_t partition_tokens(int64_t num_items, int64_t max_seq_len, int64_t requested) {
  if (requested > 0) return requested;
  const int64_t wanted = static_cast<int64_t>(at::get_num_threads()) * kItemsPerThread;
  if (num_items >= wanted || max_seq_len <= kMinPartitionTokens) return max_seq_len;
  const int64_t parts = (wanted + num_items - 1) / num_items;
  int64_t tokens = std::max(kMinPartitionTokens, (max_seq_len + parts - 1) / parts);
  return (tokens + kChunkTokens - 1) / kChunkTokens * kChunkTokens;
}

void check_decode_args(const at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const at::Tensor& block_tables,
                       const at::Tensor& seq_lens, const at::Tensor& rows) {
  TORCH_CHECK(query.device().is_cpu(), "paged_decode runs on cpu tensors");
  TORCH_CHECK(query.dim() == 3 && out.sizes() == query.sizes(),
              "query and out must be [num_tokens, num_heads, head_dim]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "k_cache and v_cache must be [num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type() &&
                  out.scalar_type() == query.scalar_type() &&
                  (query.scalar_type() == k_cache.scalar_type() ||
                   query.scalar_type() == at::kFloat),
              "query and out must share the caches' dtype, or be float32");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16,
              "paged_decode supports float32 and bfloat16, got ", k_cache.scalar_type());
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "head_dim must be the innermost dim");
  const int64_t head_dim = k_cache.size(3);
  TORCH_CHECK(query.size(2) == head_dim, "query and cache head_dim differ");
  TORCH_CHECK(head_dim % kLanes == 0, "head_dim must be a multiple of ", kLanes, " on ", kIsa);
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0,
              "num_heads must be a multiple of num_kv_heads");
  for (const at::Tensor* t : {&block_tables, &seq_lens, &rows})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(),
                "block_tables, seq_lens and rows must be contiguous int32");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == seq_lens.size(0) &&
                  rows.size(0) == seq_lens.size(0),
              "block_tables, seq_lens and rows must have one row per sequence");
}

template <typename T, typename Q>
void paged_decode_impl(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const at::Tensor& block_tables,
                       const at::Tensor& seq_lens, const at::Tensor& rows, double scale,
                       int64_t requested_partition) {
  const int64_t num_seqs = seq_lens.size(0);
  const int64_t num_heads = query.size(1);
  const int64_t num_kv_heads = k_cache.size(2);
  const int64_t head_dim = k_cache.size(3);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const CacheView cache{k_cache.size(1), num_kv_heads * head_dim,
                        k_cache.size(1) * num_kv_heads * head_dim, k_cache.size(0)};
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* row_of = rows.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const Q* q_base = query.data_ptr<Q>();
  Q* out_base = out.data_ptr<Q>();
  const T* k_base = k_cache.data_ptr<T>();
  const T* v_base = v_cache.data_ptr<T>();
  const int64_t num_tokens = query.size(0);

  int64_t max_len = 0;
  for (int64_t i = 0; i < num_seqs; ++i) {
    TORCH_CHECK(lens[i] >= 0 && (lens[i] + cache.block_size - 1) / cache.block_size <= max_blocks,
                "seq_lens[", i, "] = ", lens[i], " needs more blocks than the table holds");
    TORCH_CHECK(row_of[i] >= 0 && row_of[i] < num_tokens, "rows[", i, "] is out of range");
    max_len = std::max<int64_t>(max_len, lens[i]);
  }
  const int64_t slices = (group + kMaxGroup - 1) / kMaxGroup;
  const int64_t wanted = static_cast<int64_t>(at::get_num_threads()) * kItemsPerThread;
  const int64_t part = partition_tokens(num_seqs * slices, max_len, requested_partition);
  int64_t num_row_items = 0;  // items if each takes whole rows (every KV head)
  for (int64_t i = 0; i < num_seqs; ++i)
    num_row_items += slices * std::max<int64_t>(1, (lens[i] + part - 1) / part);
  // Whole rows read best (each block's bytes in one sweep); split the KV heads over items
  // only when there are still too few items for the threads.
  const int64_t head_split = std::min<int64_t>(
      num_kv_heads, std::max<int64_t>(1, (wanted + num_row_items - 1) / num_row_items));
  const int64_t heads_per_item = (num_kv_heads + head_split - 1) / head_split;

  // An output is (sequence, KV head range, slice); its parts are consecutive items.
  struct Output {
    int64_t seq, kv_head0, num_kv_heads, g0, group, first_partial, num_parts;
  };
  std::vector<Output> outputs;
  std::vector<Item> items;
  int64_t num_partials = 0;  // slots of kMaxGroup rows of each KV head
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t len = lens[i];
    const int64_t parts = std::max<int64_t>(1, (len + part - 1) / part);
    for (int64_t h0 = 0; h0 < num_kv_heads; h0 += heads_per_item) {
      const int64_t nh = std::min(heads_per_item, num_kv_heads - h0);
      for (int64_t g0 = 0; g0 < group; g0 += kMaxGroup) {
        const int64_t ng = std::min<int64_t>(kMaxGroup, group - g0);
        outputs.push_back({i, h0, nh, g0, ng, parts > 1 ? num_partials : -1, parts});
        for (int64_t p = 0; p < parts; ++p) {
          const int64_t start = p * part;
          const int64_t end = std::min(len, start + part);
          items.push_back({i, h0, nh, g0, ng, start, end, parts > 1 ? num_partials : -1});
          if (parts > 1) num_partials += nh;
        }
      }
    }
  }
  // Longest first: the last items a thread takes are the short ones.
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return (a.end - a.start) * a.num_kv_heads > (b.end - b.start) * b.num_kv_heads;
  });

  // Partial results, per slot (one KV head of one part) and query of its group.
  std::vector<float> part_max(num_partials * kMaxGroup), part_sum(num_partials * kMaxGroup);
  std::vector<float> part_acc(num_partials * kMaxGroup * head_dim);
  std::atomic<int64_t> next_item{0};
  std::atomic<bool> bad_table{false};
  const float fscale = static_cast<float>(scale);
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t num_workers =
      std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(num_items, 1));
  auto head_index = [&](int64_t kv_head, int64_t g) { return kv_head * group + g; };

  at::parallel_for(0, num_workers, 1, [&](int64_t, int64_t) {
    Scratch s(num_kv_heads, head_dim);
    for (int64_t k = next_item++; k < num_items; k = next_item++) {
      const Item& item = items[k];
      const int64_t row = row_of[item.seq];
      const int64_t num_rows = item.num_kv_heads * item.group;
      if (item.end <= item.start) {
        std::fill(s.max.begin(), s.max.begin() + num_rows,
                  -std::numeric_limits<float>::infinity());
        std::fill(s.sum.begin(), s.sum.begin() + num_rows, 0.f);
        std::fill(s.acc.begin(), s.acc.begin() + num_rows * head_dim, 0.f);
      } else if (!attend_item<T, Q>(item, q_base + row * query.stride(0), query.stride(1),
                                    head_dim, group, fscale, k_base, v_base,
                                    tables + item.seq * max_blocks, cache, s)) {
        bad_table = true;
        continue;
      }
      for (int64_t h = 0; h < item.num_kv_heads; ++h) {
        for (int64_t g = 0; g < item.group; ++g) {
          const int64_t r = h * item.group + g;
          const float* acc = s.acc.data() + r * head_dim;
          if (item.partial < 0) {
            Q* o = out_base + row * out.stride(0) +
                   head_index(item.kv_head0 + h, item.g0 + g) * out.stride(1);
            write_output(o, acc, s.sum[r], head_dim);
          } else {
            const int64_t slot = (item.partial + h) * kMaxGroup + g;
            part_max[slot] = s.max[r];
            part_sum[slot] = s.sum[r];
            std::copy(acc, acc + head_dim, part_acc.begin() + slot * head_dim);
          }
        }
      }
    }
  });
  TORCH_CHECK(!bad_table, "a block table names a block outside the cache");

  // Merge partitions: rescale each part to the common max, sum, normalise.
  std::vector<float> merged(head_dim);
  for (const Output& o : outputs) {
    if (o.first_partial < 0) continue;
    Q* out_row = out_base + row_of[o.seq] * out.stride(0);
    for (int64_t h = 0; h < o.num_kv_heads; ++h) {
      for (int64_t g = 0; g < o.group; ++g) {
        // Part p of this output holds its KV head h in slot first_partial + p * nh + h.
        auto slot_of = [&](int64_t p) {
          return (o.first_partial + p * o.num_kv_heads + h) * kMaxGroup + g;
        };
        float max = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p < o.num_parts; ++p) max = std::max(max, part_max[slot_of(p)]);
        float sum = 0.f;
        std::fill(merged.begin(), merged.end(), 0.f);
        for (int64_t p = 0; p < o.num_parts; ++p) {
          const int64_t slot = slot_of(p);
          if (part_sum[slot] == 0.f) continue;
          const float w = std::exp(part_max[slot] - max);
          sum += part_sum[slot] * w;
          const float* acc = part_acc.data() + slot * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) merged[d] += acc[d] * w;
        }
        write_output(out_row + head_index(o.kv_head0 + h, o.g0 + g) * out.stride(1),
                     merged.data(), sum, head_dim);
      }
    }
  }
}

// Decode attention: for each sequence i, query row rows[i] attends to its first
// seq_lens[i] cached tokens; the result goes to the same row of out.
void paged_decode(at::Tensor out, const at::Tensor& query, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                  const at::Tensor& seq_lens, const at::Tensor& rows, double scale,
                  int64_t partition_size) {
  check_decode_args(out, query, k_cache, v_cache, block_tables, seq_lens, rows);
  if (seq_lens.size(0) == 0) return;
  if (k_cache.scalar_type() == at::kFloat) {
    paged_decode_impl<float, float>(out, query, k_cache, v_cache, block_tables, seq_lens, rows,
                                    scale, partition_size);
  } else if (query.scalar_type() == at::kFloat) {
    paged_decode_impl<BF16, float>(out, query, k_cache, v_cache, block_tables, seq_lens, rows,
                                   scale, partition_size);
  } else {
    paged_decode_impl<BF16, BF16>(out, query, k_cache, v_cache, block_tables, seq_lens, rows,
                                  scale, partition_size);
  }
}

// Write each token's K and V rows into its slot; a slot of -1 is padding, skipped.
void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor k_cache,
              at::Tensor v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes(),
              "key and value must be [num_tokens, num_kv_heads, head_dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
  TORCH_CHECK(key.scalar_type() == value.scalar_type() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "key and value must share a dtype, and so must the caches");
  const bool narrow = key.scalar_type() != k_cache.scalar_type();
  TORCH_CHECK(!narrow || (key.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kBFloat16),
              "store_kv copies rows of the caches' dtype, or rounds float32 rows into bfloat16");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.size(0) == key.size(0),
              "slot_mapping must be contiguous int64 with one slot per token");
  const int64_t row = k_cache.size(2) * k_cache.size(3);
  TORCH_CHECK(key.size(1) * key.size(2) == row, "key rows and cache rows differ in size");
  for (const at::Tensor* t : {&key, &value})
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == t->size(2),
                "each token's [num_kv_heads, head_dim] must be contiguous");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t bytes = row * k_cache.element_size();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* kp = static_cast<const char*>(key.data_ptr());
  const auto* vp = static_cast<const char*>(value.data_ptr());
  const int64_t k_stride = key.stride(0) * key.element_size();
  const int64_t v_stride = value.stride(0) * value.element_size();
  for (int64_t t = 0; t < key.size(0); ++t) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    TORCH_CHECK(slot < num_slots, "slot_mapping[", t, "] = ", slot, " is outside the cache");
    if (!narrow) {
      std::memcpy(kc + slot * bytes, kp + t * k_stride, bytes);
      std::memcpy(vc + slot * bytes, vp + t * v_stride, bytes);
      continue;
    }
    // Round to nearest even, as torch's float32 -> bfloat16 conversion does.
    auto* kd = reinterpret_cast<BF16*>(kc + slot * bytes);
    auto* vd = reinterpret_cast<BF16*>(vc + slot * bytes);
    const auto* ks = reinterpret_cast<const float*>(kp + t * k_stride);
    const auto* vs = reinterpret_cast<const float*>(vp + t * v_stride);
    for (int64_t i = 0; i < row; ++i) {
      kd[i] = BF16(ks[i]);
      vd[i] = BF16(vs[i]);
    }
  }
}

std::string isa() { return kIsa; }

int64_t vector_lanes() { return kLanes; }

}  // namespace
}  // namespace twolane

TORCH_LIBRARY(twolane_cpu, m) {
  m.def(
      "paged_decode(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, "
      "Tensor block_tables, Tensor seq_lens, Tensor rows, float scale, int partition_size) -> ()",
      &twolane::paged_decode);
  m.def(
      "store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping) -> ()",
      &twolane::store_kv);
  m.def("isa() -> str", &twolane::isa);
  m.def("vector_lanes() -> int", &twolane::vector_lanes);
}
