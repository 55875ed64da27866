// Native CPU attention over the paged KV cache: decode reads K/V blocks where they are.
//
// Cache layout (shared with every backend):
//   k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous
//   slot = block_id * block_size + offset_in_block
//
// One work item is (sequence, KV head, slice of at most kMaxGroup query heads of the
// group, context partition). It walks the sequence's block table in chunks of
// kChunkTokens tokens, scores the chunk's keys against the slice's queries, updates an
// online softmax (running max and sum, fp32) and accumulates the weighted values in
// fp32. Keys and values are read in the cache's dtype; bf16 rows are widened to fp32
// chunk by chunk (a shift, no rounding), never the whole context. Items run on torch's
// intra-op threads, longest first, taken from a shared counter so that ragged contexts
// balance. When there are too few items for the threads (small batches, long
// contexts), each context is split into partitions whose partial results (max, sum,
// accumulator) are merged afterwards.
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
  int64_t kv_head;
  int64_t head0;      // first query head of the slice
  int64_t num_heads;  // query heads in the slice (<= kMaxGroup)
  int64_t start;      // context positions [start, end)
  int64_t end;
  int64_t partial;    // slot for a partial result, or -1 when the item is its output's only part
};

// Per-thread buffers, reused across items.
struct Scratch {
  explicit Scratch(int64_t head_dim)
      : q(kMaxGroup * head_dim), acc(kMaxGroup * head_dim),
        keys(kChunkTokens * head_dim), values(kChunkTokens * head_dim) {}
  std::vector<float> q, acc, keys, values;
  alignas(64) float scores[kMaxGroup][kChunkTokens];
  float max[kMaxGroup];
  float sum[kMaxGroup];
};

// Attend one item: fills s.max, s.sum and s.acc (unnormalised) for its query heads.
// Returns false when the block table points outside the cache.
template <typename T>
bool attend_item(const Item& item, const T* query_row, int64_t head_dim, float scale,
                 const T* k_cache, const T* v_cache, const int32_t* table,
                 const CacheView& cache, Scratch& s) {
  const int group = static_cast<int>(item.num_heads);
  for (int g = 0; g < group; ++g) {
    const T* q = query_row + (item.head0 + g) * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) s.q[g * head_dim + d] = static_cast<float>(q[d]) * scale;
    s.max[g] = -std::numeric_limits<float>::infinity();
    s.sum[g] = 0.f;
  }
  std::fill(s.acc.begin(), s.acc.begin() + group * head_dim, 0.f);
  constexpr bool kWiden = !std::is_same_v<T, float>;
  const int64_t head_offset = item.kv_head * head_dim;
  const float* key_rows[kChunkTokens];
  const float* value_rows[kChunkTokens];
  const T* next_k[kChunkTokens];
  const T* next_v[kChunkTokens];
  auto locate = [&](int64_t pos, const T*& k, const T*& v) -> bool {
    int64_t block = table[pos / cache.block_size];
    if (block < 0 || block >= cache.num_blocks) return false;
    int64_t offset = block * cache.block_stride + (pos % cache.block_size) * cache.token_stride +
                     head_offset;
    k = k_cache + offset;
    v = v_cache + offset;
    return true;
  };
  auto gather = [&](int64_t start, int n) -> bool {
    for (int t = 0; t < n; ++t)
      if (!locate(start + t, next_k[t], next_v[t])) return false;
    return true;
  };
  int n = static_cast<int>(std::min<int64_t>(kChunkTokens, item.end - item.start));
  if (!gather(item.start, n)) return false;
  for (int64_t c0 = item.start; c0 < item.end;) {
    const T* cur_k[kChunkTokens];
    const T* cur_v[kChunkTokens];
    std::copy(next_k, next_k + n, cur_k);
    std::copy(next_v, next_v + n, cur_v);
    const int64_t c1 = c0 + n;
    const int next_n = static_cast<int>(std::min<int64_t>(kChunkTokens, item.end - c1));
    if (next_n > 0) {
      if (!gather(c1, next_n)) return false;
      for (int t = 0; t < next_n; ++t) {
        prefetch_row(next_k[t], head_dim * static_cast<int64_t>(sizeof(T)));
        prefetch_row(next_v[t], head_dim * static_cast<int64_t>(sizeof(T)));
      }
    }
    for (int t = 0; t < n; ++t) {
      if constexpr (kWiden) {
        widen_row(cur_k[t], s.keys.data() + t * head_dim, head_dim);
        widen_row(cur_v[t], s.values.data() + t * head_dim, head_dim);
        key_rows[t] = s.keys.data() + t * head_dim;
        value_rows[t] = s.values.data() + t * head_dim;
      } else {
        key_rows[t] = reinterpret_cast<const float*>(cur_k[t]);
        value_rows[t] = reinterpret_cast<const float*>(cur_v[t]);
      }
    }
    score_chunk(group, s.q.data(), head_dim, key_rows, n, s.scores);
    for (int g = 0; g < group; ++g) {
      float* sc = s.scores[g];
      float chunk_max = *std::max_element(sc, sc + n);
      float new_max = std::max(s.max[g], chunk_max);
      if (new_max > s.max[g]) {
        if (s.sum[g] > 0.f) {
          float rescale = std::exp(s.max[g] - new_max);
          s.sum[g] *= rescale;
          scale_row(s.acc.data() + g * head_dim, rescale, head_dim);
        }
        s.max[g] = new_max;
      }
      s.sum[g] += exp_and_sum(sc, n, new_max);
      accumulate_values(s.acc.data() + g * head_dim, sc, value_rows, n, head_dim);
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
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() &&
                  out.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "query, out and the caches must share one dtype");
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

template <typename T>
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
  const T* q_base = query.data_ptr<T>();
  T* out_base = out.data_ptr<T>();
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
  const int64_t part = partition_tokens(num_seqs * num_kv_heads * slices, max_len,
                                        requested_partition);

  // An output is (sequence, KV head, slice); its parts are consecutive items.
  struct Output {
    int64_t seq, kv_head, head0, num_heads, first_partial, num_parts;
  };
  std::vector<Output> outputs;
  std::vector<Item> items;
  int64_t num_partials = 0;
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t len = lens[i];
    const int64_t parts = std::max<int64_t>(1, (len + part - 1) / part);
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      for (int64_t g0 = 0; g0 < group; g0 += kMaxGroup) {
        const int64_t ng = std::min<int64_t>(kMaxGroup, group - g0);
        const int64_t head0 = h * group + g0;
        outputs.push_back({i, h, head0, ng, parts > 1 ? num_partials : -1, parts});
        for (int64_t p = 0; p < parts; ++p) {
          const int64_t start = p * part;
          const int64_t end = std::min(len, start + part);
          items.push_back({i, h, head0, ng, start, end, parts > 1 ? num_partials++ : -1});
        }
      }
    }
  }
  // Longest first: the last items a thread takes are the short ones.
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.end - a.start > b.end - b.start; });

  // Partial results: [num_partials, kMaxGroup] max and sum, [num_partials, kMaxGroup, head_dim] acc.
  std::vector<float> part_max(num_partials * kMaxGroup), part_sum(num_partials * kMaxGroup);
  std::vector<float> part_acc(num_partials * kMaxGroup * head_dim);
  std::atomic<int64_t> next_item{0};
  std::atomic<bool> bad_table{false};
  const float fscale = static_cast<float>(scale);
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t num_workers =
      std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(num_items, 1));

  at::parallel_for(0, num_workers, 1, [&](int64_t, int64_t) {
    Scratch s(head_dim);
    for (int64_t k = next_item++; k < num_items; k = next_item++) {
      const Item& item = items[k];
      const int64_t row = row_of[item.seq];
      const T* q_row = q_base + row * query.stride(0);
      // query.stride(1) may differ from head_dim for a strided view: gather the slice.
      std::vector<T> q_gathered;
      if (query.stride(1) != head_dim) {
        q_gathered.resize(num_heads * head_dim);
        for (int64_t h = 0; h < num_heads; ++h)
          std::copy(q_row + h * query.stride(1), q_row + h * query.stride(1) + head_dim,
                    q_gathered.begin() + h * head_dim);
        q_row = q_gathered.data();
      }
      if (item.end <= item.start) {
        for (int g = 0; g < item.num_heads; ++g) {
          s.max[g] = -std::numeric_limits<float>::infinity();
          s.sum[g] = 0.f;
        }
        std::fill(s.acc.begin(), s.acc.end(), 0.f);
      } else if (!attend_item<T>(item, q_row, head_dim, fscale, k_base, v_base,
                                 tables + item.seq * max_blocks, cache, s)) {
        bad_table = true;
        continue;
      }
      if (item.partial < 0) {
        T* o = out_base + row * out.stride(0);
        for (int g = 0; g < item.num_heads; ++g)
          write_output(o + (item.head0 + g) * out.stride(1), s.acc.data() + g * head_dim,
                       s.sum[g], head_dim);
      } else {
        for (int g = 0; g < item.num_heads; ++g) {
          const int64_t slot = item.partial * kMaxGroup + g;
          part_max[slot] = s.max[g];
          part_sum[slot] = s.sum[g];
          std::copy(s.acc.begin() + g * head_dim, s.acc.begin() + (g + 1) * head_dim,
                    part_acc.begin() + slot * head_dim);
        }
      }
    }
  });
  TORCH_CHECK(!bad_table, "a block table names a block outside the cache");

  // Merge partitions: rescale each part to the common max, sum, normalise.
  std::vector<float> merged(head_dim);
  for (const Output& o : outputs) {
    if (o.first_partial < 0) continue;
    T* out_row = out_base + row_of[o.seq] * out.stride(0);
    for (int g = 0; g < o.num_heads; ++g) {
      float max = -std::numeric_limits<float>::infinity();
      for (int64_t p = 0; p < o.num_parts; ++p)
        max = std::max(max, part_max[(o.first_partial + p) * kMaxGroup + g]);
      float sum = 0.f;
      std::fill(merged.begin(), merged.end(), 0.f);
      for (int64_t p = 0; p < o.num_parts; ++p) {
        const int64_t slot = (o.first_partial + p) * kMaxGroup + g;
        if (part_sum[slot] == 0.f) continue;
        const float w = std::exp(part_max[slot] - max);
        sum += part_sum[slot] * w;
        const float* acc = part_acc.data() + slot * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) merged[d] += acc[d] * w;
      }
      write_output(out_row + (o.head0 + g) * out.stride(1), merged.data(), sum, head_dim);
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
    paged_decode_impl<float>(out, query, k_cache, v_cache, block_tables, seq_lens, rows, scale,
                             partition_size);
  } else {
    paged_decode_impl<BF16>(out, query, k_cache, v_cache, block_tables, seq_lens, rows, scale,
                            partition_size);
  }
}

// Write each token's K and V rows into its slot; a slot of -1 is padding, skipped.
void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor k_cache,
              at::Tensor v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes(),
              "key and value must be [num_tokens, num_kv_heads, head_dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() &&
                  value.scalar_type() == v_cache.scalar_type() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "key, value and the caches must share one dtype");
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
    std::memcpy(kc + slot * bytes, kp + t * k_stride, bytes);
    std::memcpy(vc + slot * bytes, vp + t * v_stride, bytes);
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
