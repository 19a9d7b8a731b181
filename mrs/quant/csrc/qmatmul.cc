// y[m, n] = sum_k x[m, k] * w[n, k] for a QArray w (see mrs/quant/qarray.py), as an
// XLA FFI custom call for CPU. Built and registered by mrs/quant/native.py.
//
// Why by hand: XLA CPU fuses the dequantization into a reduction loop that converts
// every scale per element and does not vectorize well; at batch 1 that loop is ~80%
// of a decode step. Here each 8-value chunk is converted once (AVX2/FMA/F16C),
// multiplied with up to four activation rows held in registers, and each block's dot
// product scaled once (the block offsets fold into sums of the activations).
// Activations stay float32, so results match dequantize-then-matmul to rounding.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 4;  // activation rows per pass over the weights (registers per output row)

struct Weights {
  const uint8_t* data;  // [units, nblocks, block]: rows (bits 8) or row pairs (bits 4 and 6)
  const uint8_t* high;  // bits 6: [rows / 4, nblocks, block], the top two bits in row quads
  const void* scale;    // [rows, nblocks]
  const void* min;      // [rows, nblocks] or nullptr
  bool data_signed, scale_f16, min_f16;
  int bits, block, zero;
  int64_t rows, nblocks;
};

inline float Scalar(const void* p, int64_t i, bool f16) {
  return f16 ? _cvtsh_ss(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Block b of row r dequantizes as q * scale + offset (offset = min - zero * scale).
inline void BlockAffine(const Weights& w, int64_t r, int64_t b, float* scale, float* offset) {
  const int64_t i = r * w.nblocks + b;
  *scale = Scalar(w.scale, i, w.scale_f16);
  const float min = w.min ? Scalar(w.min, i, w.min_f16) : 0.0f;
  *offset = min - static_cast<float>(w.zero) * *scale;
}

// Eight stored values, a byte each (int8, or uint8 values below 128), as floats.
inline __m256 Widen(__m128i bytes, bool is_signed) {
  return _mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes));
}

// Per output row and activation row: sum over blocks of scale * (q . x_block) in a vector
// accumulator, plus offset * sum(x_block) (xsum, precomputed per call) in a scalar one.
// The raw integers multiply x directly; each block's chain is independent of the next.
template <int T>
struct RowSums {
  __m256 acc[T];
  float off[T];

  RowSums() {
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps(), off[t] = 0.0f;
  }
  void AddBlock(const __m256* dot, float scale, float offset, const float* xsum, int64_t nblocks, int64_t b) {
    const __m256 s = _mm256_set1_ps(scale);
    for (int t = 0; t < T; ++t) {
      acc[t] = _mm256_fmadd_ps(s, dot[t], acc[t]);
      off[t] += offset * xsum[t * nblocks + b];
    }
  }
  void Store(float* y, int64_t n, int64_t r) const {
    for (int t = 0; t < T; ++t) y[t * n + r] = HorizontalSum(acc[t]) + off[t];
  }
};

template <int T>
inline void Dot(__m256 value, const float* x, int64_t k, int64_t col, __m256* dot) {
  for (int t = 0; t < T; ++t) dot[t] = _mm256_fmadd_ps(value, _mm256_loadu_ps(x + t * k + col), dot[t]);
}

// One byte per value: output rows [begin, end) for activation rows x[0, T) (row stride k).
template <int T, int BLOCK>
void Rows8(const Weights& w, const float* x, const float* xsum, int64_t k, float* y, int64_t n, int64_t begin,
           int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    RowSums<T> sums;
    const uint8_t* row = w.data + r * k;
    for (int64_t b = 0; b < w.nblocks; ++b) {
      __m256 dot[T];
      for (int t = 0; t < T; ++t) dot[t] = _mm256_setzero_ps();
      for (int c = 0; c < BLOCK; c += 8) {
        const int64_t col = b * BLOCK + c;
        Dot<T>(Widen(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + col)), w.data_signed), x, k, col, dot);
      }
      float scale, offset;
      BlockAffine(w, r, b, &scale, &offset);
      sums.AddBlock(dot, scale, offset, xsum, w.nblocks, b);
    }
    sums.Store(y, n, r);
  }
}

// 4-bit row pairs: pair p holds row p in its low nibbles and row p + rows/2 in its high ones.
template <int T, int BLOCK>
void Pairs4(const Weights& w, const float* x, const float* xsum, int64_t k, float* y, int64_t n, int64_t begin,
            int64_t end) {
  const int64_t half = w.rows / 2;
  const __m256i low_mask = _mm256_set1_epi32(0x0F);
  for (int64_t p = begin; p < end; ++p) {
    RowSums<T> lo_sums, hi_sums;
    const uint8_t* pair = w.data + p * k;
    for (int64_t b = 0; b < w.nblocks; ++b) {
      __m256 lo_dot[T], hi_dot[T];
      for (int t = 0; t < T; ++t) lo_dot[t] = hi_dot[t] = _mm256_setzero_ps();
      for (int c = 0; c < BLOCK; c += 8) {
        const int64_t col = b * BLOCK + c;
        // Widen the bytes first (one load-and-widen), then split the nibbles in 32-bit lanes.
        const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(pair + col)));
        Dot<T>(_mm256_cvtepi32_ps(_mm256_and_si256(bytes, low_mask)), x, k, col, lo_dot);
        Dot<T>(_mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4)), x, k, col, hi_dot);
      }
      float scale, offset;
      BlockAffine(w, p, b, &scale, &offset);
      lo_sums.AddBlock(lo_dot, scale, offset, xsum, w.nblocks, b);
      BlockAffine(w, p + half, b, &scale, &offset);
      hi_sums.AddBlock(hi_dot, scale, offset, xsum, w.nblocks, b);
    }
    lo_sums.Store(y, n, p);
    hi_sums.Store(y, n, p + half);
  }
}

// 6-bit row quads: rows u, u + q, u + 2q, u + 3q (q = rows / 4). Their low nibbles are row
// pairs u (rows u, u + 2q) and u + q (rows u + q, u + 3q); their top bits are high[u].
template <int T, int BLOCK>
void Quads6(const Weights& w, const float* x, const float* xsum, int64_t k, float* y, int64_t n, int64_t begin,
            int64_t end) {
  const int64_t quarter = w.rows / 4;
  const __m256i nibble = _mm256_set1_epi32(0x0F), two = _mm256_set1_epi32(0x03), top = _mm256_set1_epi32(0x30);
  auto widen = [](const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  };
  for (int64_t u = begin; u < end; ++u) {
    RowSums<T> sums[4];
    const uint8_t* near = w.data + u * k;
    const uint8_t* far = w.data + (u + quarter) * k;
    const uint8_t* high = w.high + u * k;
    for (int64_t b = 0; b < w.nblocks; ++b) {
      __m256 dot[4][T];
      for (int r = 0; r < 4; ++r)
        for (int t = 0; t < T; ++t) dot[r][t] = _mm256_setzero_ps();
      for (int c = 0; c < BLOCK; c += 8) {
        const int64_t col = b * BLOCK + c;
        const __m256i a = widen(near + col), e = widen(far + col), h = widen(high + col);
        const __m256i values[4] = {
            _mm256_or_si256(_mm256_and_si256(a, nibble), _mm256_slli_epi32(_mm256_and_si256(h, two), 4)),
            _mm256_or_si256(_mm256_and_si256(e, nibble), _mm256_slli_epi32(_mm256_and_si256(h, _mm256_slli_epi32(two, 2)), 2)),
            _mm256_or_si256(_mm256_srli_epi32(a, 4), _mm256_and_si256(h, top)),
            _mm256_or_si256(_mm256_srli_epi32(e, 4), _mm256_and_si256(_mm256_srli_epi32(h, 2), top)),
        };
        for (int r = 0; r < 4; ++r) Dot<T>(_mm256_cvtepi32_ps(values[r]), x, k, col, dot[r]);
      }
      for (int r = 0; r < 4; ++r) {
        float scale, offset;
        BlockAffine(w, u + r * quarter, b, &scale, &offset);
        sums[r].AddBlock(dot[r], scale, offset, xsum, w.nblocks, b);
      }
    }
    for (int r = 0; r < 4; ++r) sums[r].Store(y, n, u + r * quarter);
  }
}

template <int T, int BLOCK>
void Units(const Weights& w, const float* x, const float* xsum, int64_t k, float* y, int64_t n, int64_t begin,
           int64_t end) {
  if (w.bits == 6) {
    Quads6<T, BLOCK>(w, x, xsum, k, y, n, begin, end);
  } else if (w.bits == 4) {
    Pairs4<T, BLOCK>(w, x, xsum, k, y, n, begin, end);
  } else {
    Rows8<T, BLOCK>(w, x, xsum, k, y, n, begin, end);
  }
}

template <int T>
void Units(const Weights& w, const float* x, const float* xsum, int64_t k, float* y, int64_t n, int64_t begin,
           int64_t end) {
  if (w.block == 16) {
    Units<T, 16>(w, x, xsum, k, y, n, begin, end);
  } else {  // QMatmul admits 16 and 32 only
    Units<T, 32>(w, x, xsum, k, y, n, begin, end);
  }
}

// Output units [begin, end) for every activation row, kTile rows per pass over the weights.
void Chunk(const Weights& w, const float* x, const float* xsum, int64_t m, int64_t k, float* y, int64_t begin,
           int64_t end) {
  for (int64_t m0 = 0; m0 < m; m0 += kTile) {
    const float* xt = x + m0 * k;
    const float* st = xsum + m0 * w.nblocks;
    float* yt = y + m0 * w.rows;
    switch (std::min<int64_t>(kTile, m - m0)) {
      case 1: Units<1>(w, xt, st, k, yt, w.rows, begin, end); break;
      case 2: Units<2>(w, xt, st, k, yt, w.rows, begin, end); break;
      case 3: Units<3>(w, xt, st, k, yt, w.rows, begin, end); break;
      default: Units<4>(w, xt, st, k, yt, w.rows, begin, end); break;
    }
  }
}

bool IsF16(ffi::DataType t) { return t == ffi::DataType::F16; }

ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer data, ffi::AnyBuffer scale,
                   ffi::AnyBuffer min, ffi::AnyBuffer high, ffi::Result<ffi::Buffer<ffi::F32>> y, int32_t bits,
                   int32_t zero) {
  const auto xd = x.dimensions(), dd = data.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || dd.size() != 3 || sd.size() != 2)
    return ffi::Error::InvalidArgument("qmatmul: x must be [m, k], data [units, nblocks, block], scale [rows, nblocks]");
  const int64_t m = xd[0], k = xd[1], rows = sd[0], nblocks = sd[1], block = dd[2];
  const bool is_int8 = data.element_type() == ffi::DataType::S8;
  if (!is_int8 && data.element_type() != ffi::DataType::U8)
    return ffi::Error::InvalidArgument("qmatmul: data must be int8 or uint8");
  const int64_t group = bits == 8 ? 1 : (bits == 4 ? 2 : 4);  // rows packed together
  if ((bits != 4 && bits != 6 && bits != 8) || (block != 16 && block != 32) || dd[1] != nblocks ||
      nblocks * block != k || rows % group || dd[0] != rows / std::min<int64_t>(group, 2))
    return ffi::Error::InvalidArgument("qmatmul: data, scale and x shapes disagree");
  if (high.element_count() != (bits == 6 ? rows / 4 * k : 0) || (bits == 6 && high.element_type() != ffi::DataType::U8))
    return ffi::Error::InvalidArgument("qmatmul: high must be uint8 [rows / 4, nblocks, block] for 6 bits, else empty");
  const bool has_min = min.element_count() > 0;
  for (const ffi::AnyBuffer* b : {&scale, &min}) {
    if (b->element_count() && b->element_type() != ffi::DataType::F16 && b->element_type() != ffi::DataType::F32)
      return ffi::Error::InvalidArgument("qmatmul: scale and min must be float16 or float32");
  }
  if (has_min && min.element_count() != rows * nblocks)
    return ffi::Error::InvalidArgument("qmatmul: min must be [rows, nblocks] or empty");
  const auto yd = y->dimensions();
  if (yd.size() != 2 || yd[0] != m || yd[1] != rows)
    return ffi::Error::InvalidArgument("qmatmul: output must be [m, rows]");

  const Weights w{static_cast<const uint8_t*>(data.untyped_data()), static_cast<const uint8_t*>(high.untyped_data()),
                  scale.untyped_data(),
                  has_min ? min.untyped_data() : nullptr, is_int8, IsF16(scale.element_type()),
                  IsF16(min.element_type()), bits, static_cast<int>(block), zero, rows, nblocks};
  const float* xs = x.typed_data();
  std::vector<float> xsum(m * nblocks, 0.0f);  // each activation block's sum, for the offsets
  for (int64_t i = 0; i < m * nblocks; ++i)
    for (int64_t j = 0; j < block; ++j) xsum[i] += xs[i * block + j];
  const int64_t units = rows / group;  // rows, row pairs or row quads
  mrs::ParallelFor(pool, units, mrs::ChunksFor(pool, units, 64), [&](int64_t begin, int64_t end) {
    Chunk(w, xs, xsum.data(), m, k, y->typed_data(), begin, end);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MrsQMatmul, QMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("zero"));
