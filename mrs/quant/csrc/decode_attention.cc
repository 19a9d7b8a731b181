// One decode step's attention over the KV cache, as an XLA FFI custom call for CPU
// (see cached_attention in mrs/models/layers.py). Built by mrs/quant/native.py.
//
// Why by hand: XLA materializes the first kv_len rows of every layer's cache before its
// dots (a copy as large as the read), and when the read fuses instead, it pulls the
// cache update into it and copies the whole cache. As a custom call the update stays
// in place and each key and value row is read once, straight from the cache.
//
// The cache is paged (mrs/models/kv_cache.py): q [b, Hkv, G, D]; keys [P, Hkv, D, page]
// (transposed: a score chunk is 8 contiguous keys of one page); values [P, Hkv, page, D];
// pages [b, n], each sequence's block table (logical page j of slot i lives in pool page
// pages[i, j]); positions [b]. Slot i attends to positions s with s <= positions[i],
// s < kv_len and, with a window, s > positions[i] - window.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Shapes {
  int64_t kv_heads, group, dim, page, pool, table;  // table: block table columns per slot
};

struct Options {
  int64_t kv_len, window;
  float scale, softcap;
};

// Scores of query q [D] for one page's keys [lo, hi): scores[s - lo]. Keys [D, page] row
// by row, 32 keys per pass in four independent accumulators (one chain is FMA-latency-bound).
void Scores(const float* q, const float* keys, const Shapes& sh, int64_t lo, int64_t hi, float* scores) {
  int64_t s = lo;
  for (; s + 32 <= hi; s += 32) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t d = 0; d < sh.dim; ++d) {
      const __m256 qd = _mm256_set1_ps(q[d]);
      const float* row = keys + d * sh.page + s;
      for (int i = 0; i < 4; ++i) acc[i] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row + 8 * i), acc[i]);
    }
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(scores + (s - lo) + 8 * i, acc[i]);
  }
  for (; s < hi; ++s) {
    float acc = 0.0f;
    for (int64_t d = 0; d < sh.dim; ++d) acc += q[d] * keys[d * sh.page + s];
    scores[s - lo] = acc;
  }
}

// Softmax of one row of n scores in place, after scaling and the optional softcap.
void Softmax(float* row, int64_t n, const Options& o) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < n; ++s) {
    float v = row[s] * o.scale;
    if (o.softcap > 0.0f) v = std::tanh(v / o.softcap) * o.softcap;
    row[s] = v;
    top = std::max(top, v);
  }
  float total = 0.0f;
  for (int64_t s = 0; s < n; ++s) total += row[s] = std::exp(row[s] - top);
  const float inv = 1.0f / total;
  for (int64_t s = 0; s < n; ++s) row[s] *= inv;
}

// out [D] += sum_s probs[s] * values[lo + s, :] over one page's values, 32 output dims per
// pass where they fit.
void Mix(const float* probs, const float* values, const Shapes& sh, int64_t lo, int64_t n, float* out) {
  int64_t d = 0;
  for (; d + 32 <= sh.dim; d += 32) {
    __m256 acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = _mm256_loadu_ps(out + d + 8 * i);
    for (int64_t s = 0; s < n; ++s) {
      const __m256 p = _mm256_set1_ps(probs[s]);
      const float* row = values + (lo + s) * sh.dim + d;
      for (int i = 0; i < 4; ++i) acc[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(row + 8 * i), acc[i]);
    }
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + d + 8 * i, acc[i]);
  }
  for (; d < sh.dim; d += 8) {  // head_dim % 8 == 0
    __m256 acc = _mm256_loadu_ps(out + d);
    for (int64_t s = 0; s < n; ++s)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(probs[s]), _mm256_loadu_ps(values + (lo + s) * sh.dim + d), acc);
    _mm256_storeu_ps(out + d, acc);
  }
}

// One (slot, kv head): its group of queries over that head's keys and values, page by page.
// keys/values point at the head's rows of pool page 0; a pool page is kv_heads times that.
bool Head(const float* q, const float* keys, const float* values, const int32_t* block, int32_t position,
          const Shapes& sh, const Options& o, float* out) {
  const int64_t hi = std::min<int64_t>({static_cast<int64_t>(position) + 1, o.kv_len, sh.page * sh.table});
  const int64_t lo = o.window > 0 ? std::max<int64_t>(0, static_cast<int64_t>(position) - o.window + 1) : 0;
  std::fill(out, out + sh.group * sh.dim, 0.0f);
  // A padding slot (its position past the table) or no key to see: zeros, not NaN.
  if (position >= sh.page * sh.table || hi <= lo) return true;
  const int64_t first = lo / sh.page, last = (hi - 1) / sh.page;
  for (int64_t j = first; j <= last; ++j)
    if (block[j] < 0 || block[j] >= sh.pool) return false;  // a position the table gives no page
  const int64_t n = hi - lo, page_stride = sh.kv_heads * sh.dim * sh.page;
  std::vector<float> probs(n);
  for (int64_t g = 0; g < sh.group; ++g) {  // the group's queries share keys and values (hot in cache)
    for (int64_t j = first; j <= last; ++j) {
      const int64_t begin = std::max(lo, j * sh.page) - j * sh.page, end = std::min(hi, (j + 1) * sh.page) - j * sh.page;
      Scores(q + g * sh.dim, keys + block[j] * page_stride, sh, begin, end, probs.data() + (j * sh.page + begin - lo));
    }
    Softmax(probs.data(), n, o);
    for (int64_t j = first; j <= last; ++j) {
      const int64_t begin = std::max(lo, j * sh.page) - j * sh.page, end = std::min(hi, (j + 1) * sh.page) - j * sh.page;
      Mix(probs.data() + (j * sh.page + begin - lo), values + block[j] * page_stride, sh, begin, end - begin,
          out + g * sh.dim);
    }
  }
  return true;
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> keys,
                           ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> pages, ffi::Buffer<ffi::S32> positions,
                           ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t kv_len, int64_t window, float scale,
                           float softcap) {
  const auto qd = q.dimensions(), kd = keys.dimensions(), vd = values.dimensions(), td = pages.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || td.size() != 2 || positions.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("decode_attention: q, keys, values must be 4-D, pages 2-D, positions 1-D");
  const int64_t slots = qd[0];
  const Shapes sh{qd[1], qd[2], qd[3], kd[3], kd[0], td[1]};
  if (kd[1] != sh.kv_heads || kd[2] != sh.dim || vd[0] != sh.pool || vd[1] != sh.kv_heads || vd[2] != sh.page ||
      vd[3] != sh.dim || td[0] != slots || positions.dimensions()[0] != slots)
    return ffi::Error::InvalidArgument("decode_attention: q, keys, values, pages and positions shapes disagree");
  if (sh.dim % 8) return ffi::Error::InvalidArgument("decode_attention: head_dim must be a multiple of 8");
  const Options o{kv_len, window, scale, softcap};
  const float* qs = q.typed_data();
  const float* ks = keys.typed_data();
  const float* vs = values.typed_data();
  const int32_t* table = pages.typed_data();
  const int32_t* pos = positions.typed_data();
  float* os = out->typed_data();
  const int64_t head_q = sh.group * sh.dim, head_kv = sh.dim * sh.page;
  const int64_t units = slots * sh.kv_heads;
  std::atomic<bool> paged_ok{true};
  mrs::ParallelFor(pool, units, mrs::ChunksFor(pool, units, 1), [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t slot = u / sh.kv_heads, head = u % sh.kv_heads;
      if (!Head(qs + u * head_q, ks + head * head_kv, vs + head * head_kv, table + slot * sh.table, pos[slot], sh, o,
                os + u * head_q))
        paged_ok = false;
    }
  });
  if (!paged_ok) return ffi::Error::InvalidArgument("decode_attention: a position to attend has no page in its table");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MrsDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kv_len")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));
