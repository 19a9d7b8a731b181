// y[m, n] = sum_k x[m, k] * w[n, k] for a QArray w (see mrs/quant/qarray.py), as an
// XLA FFI custom call for CPU. Built and registered by mrs/quant/native.py.
//
// Why by hand: XLA CPU fuses the dequantization into a reduction loop that converts
// every scale per element and does not vectorize well; at batch 1 that loop is ~80%
// of a decode step. Here each 8-value chunk is converted once (AVX2/FMA/F16C),
// multiplied with up to four activation rows held in registers, and each block's dot
// product scaled once (the block offsets fold into sums of the activations). With more
// activation rows (batched decode, prefill chunks) that conversion would repeat per four
// rows, so instead each four output rows are dequantized once into a small float panel
// that multiplies every activation row in register tiles.
// Activations stay float32, so results match dequantize-then-matmul to rounding. One call
// takes several weights that share the activations (a layer's q, k and v; gate and up)
// and splits their rows over the threads together: the thread pool's fixed cost per call
// is about a tenth of a one-token decode step when paid per weight (tools/bench_qmatmul.py).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 4;  // activation rows per pass over the weights (registers per output row)
constexpr int64_t kManyRows = 4;  // above this many activation rows, dequantize panels (ManyRows)

struct Weights {
  const uint8_t* data;  // [units, nblocks, block]: rows (bits 8) or row pairs (bits 4 and 6)
  const uint8_t* high;  // bits 6: [rows / 4, nblocks, block], the top two bits in row quads
  const void* scale;    // [rows, nblocks]
  const void* min;      // [rows, nblocks] or nullptr
  bool data_signed, scale_f16, min_f16;
  int bits, block, zero;
  int64_t rows, nblocks, cols;  // cols = nblocks * block, the activations' width
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

inline __m256i WidenU8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// A storage unit of each layout: the output rows it holds and, for eight columns, their
// stored values (before scale and offset) as floats, kRows vectors.
struct Bytes8 {  // one byte per value: a unit is a row
  static constexpr int kRows = 1;
  const Weights& w;
  int64_t Row(int64_t u, int) const { return u; }
  void Load(int64_t u, int64_t col, __m256* v) const {
    v[0] = Widen(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.data + u * w.cols + col)), w.data_signed);
  }
};

struct Pairs4 {  // 4 bits: pair p holds row p in its low nibbles and row p + rows/2 in its high ones
  static constexpr int kRows = 2;
  const Weights& w;
  int64_t Row(int64_t p, int g) const { return p + g * (w.rows / 2); }
  void Load(int64_t p, int64_t col, __m256* v) const {
    // Widen the bytes first (one load-and-widen), then split the nibbles in 32-bit lanes.
    const __m256i bytes = WidenU8(w.data + p * w.cols + col);
    v[0] = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(0x0F)));
    v[1] = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
  }
};

// 6 bits: rows u, u + q, u + 2q, u + 3q (q = rows / 4). Their low nibbles are row pairs u
// (rows u, u + 2q) and u + q (rows u + q, u + 3q); their top bits are high[u].
struct Quads6 {
  static constexpr int kRows = 4;
  const Weights& w;
  int64_t Row(int64_t u, int g) const { return u + g * (w.rows / 4); }
  void Load(int64_t u, int64_t col, __m256* v) const {
    const __m256i nibble = _mm256_set1_epi32(0x0F), two = _mm256_set1_epi32(0x03), top = _mm256_set1_epi32(0x30);
    const __m256i a = WidenU8(w.data + u * w.cols + col), e = WidenU8(w.data + (u + w.rows / 4) * w.cols + col),
                  h = WidenU8(w.high + u * w.cols + col);
    v[0] = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(a, nibble), _mm256_slli_epi32(_mm256_and_si256(h, two), 4)));
    v[1] = _mm256_cvtepi32_ps(
        _mm256_or_si256(_mm256_and_si256(e, nibble), _mm256_slli_epi32(_mm256_and_si256(h, _mm256_slli_epi32(two, 2)), 2)));
    v[2] = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(a, 4), _mm256_and_si256(h, top)));
    v[3] = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(e, 4), _mm256_and_si256(_mm256_srli_epi32(h, 2), top)));
  }
};

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

// Few activation rows (T <= kTile): units [begin, end) for activation rows x[0, T), the
// stored integers multiplying x directly, so each weight is read and converted once per T rows.
template <class Layout, int T, int BLOCK>
void FewRows(const Layout& layout, const float* x, const float* xsum, float* y, int64_t begin, int64_t end) {
  constexpr int G = Layout::kRows;
  const Weights& w = layout.w;
  for (int64_t u = begin; u < end; ++u) {
    RowSums<T> sums[G];
    for (int64_t b = 0; b < w.nblocks; ++b) {
      __m256 dot[G][T];
      for (int g = 0; g < G; ++g)
        for (int t = 0; t < T; ++t) dot[g][t] = _mm256_setzero_ps();
      for (int c = 0; c < BLOCK; c += 8) {
        const int64_t col = b * BLOCK + c;
        __m256 values[G];
        layout.Load(u, col, values);
        for (int t = 0; t < T; ++t) {
          const __m256 xv = _mm256_loadu_ps(x + t * w.cols + col);
          for (int g = 0; g < G; ++g) dot[g][t] = _mm256_fmadd_ps(values[g], xv, dot[g][t]);
        }
      }
      for (int g = 0; g < G; ++g) {
        float scale, offset;
        BlockAffine(w, layout.Row(u, g), b, &scale, &offset);
        sums[g].AddBlock(dot[g], scale, offset, xsum, w.nblocks, b);
      }
    }
    for (int g = 0; g < G; ++g) sums[g].Store(y, w.rows, layout.Row(u, g));
  }
}

// Unit u's rows as floats (q * scale + offset) into out[g * cols + col].
template <class Layout, int BLOCK>
void Dequantize(const Layout& layout, int64_t u, float* out) {
  constexpr int G = Layout::kRows;
  const Weights& w = layout.w;
  for (int64_t b = 0; b < w.nblocks; ++b) {
    __m256 scale[G], offset[G];
    for (int g = 0; g < G; ++g) {
      float s, o;
      BlockAffine(w, layout.Row(u, g), b, &s, &o);
      scale[g] = _mm256_set1_ps(s), offset[g] = _mm256_set1_ps(o);
    }
    for (int c = 0; c < BLOCK; c += 8) {
      const int64_t col = b * BLOCK + c;
      __m256 values[G];
      layout.Load(u, col, values);
      for (int g = 0; g < G; ++g) _mm256_storeu_ps(out + g * w.cols + col, _mm256_fmadd_ps(values[g], scale[g], offset[g]));
    }
  }
}

constexpr int kPanelRows = 4;  // output rows dequantized together
#ifdef __AVX512VL__
constexpr int kPanelTile = 6;  // activation rows per pass: 24 accumulators of the 32 registers
#else
constexpr int kPanelTile = 3;  // activation rows per pass: 12 accumulators of the 16 registers
#endif

// Keeps v in a register: without it GCC folds each x load into every FMA that uses it,
// loading x once per weight row instead of once per column step.
inline void InRegister(__m256& v) { asm("" : "+x"(v)); }

// y[t, rows[r]] = wf[r] . x[t] for kPanelRows float weight rows wf (row stride cols) and T rows of x.
template <int T>
void PanelTile(const float* wf, const float* x, int64_t cols, const int64_t* rows, int nrows, float* y,
               int64_t n) {
  __m256 acc[kPanelRows][T];
  for (int r = 0; r < kPanelRows; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t col = 0; col < cols; col += 8) {
    __m256 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(x + t * cols + col), InRegister(xv[t]);
    for (int r = 0; r < kPanelRows; ++r) {
      const __m256 wv = _mm256_loadu_ps(wf + r * cols + col);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < nrows; ++r)
    for (int t = 0; t < T; ++t) y[t * n + rows[r]] = HorizontalSum(acc[r][t]);
}

// All m rows of x: tiles of T, then the remainder in one smaller tile.
template <int T>
void PanelTiles(const float* wf, const float* x, int64_t m, int64_t cols, const int64_t* rows, int nrows, float* y,
                int64_t n) {
  int64_t t0 = 0;
  for (; t0 + T <= m; t0 += T) PanelTile<T>(wf, x + t0 * cols, cols, rows, nrows, y + t0 * n, n);
  if constexpr (T > 1) {
    if (t0 < m) PanelTiles<T - 1>(wf, x + t0 * cols, m - t0, cols, rows, nrows, y + t0 * n, n);
  }
}

// Many activation rows: each group of kPanelRows output rows is dequantized once into a
// float panel (cache-resident), then multiplies all m rows of x in register tiles, so the
// conversion no longer repeats per four activation rows and the FMAs dominate.
template <class Layout, int BLOCK>
void ManyRows(const Layout& layout, const float* x, int64_t m, float* y, int64_t begin, int64_t end) {
  constexpr int G = Layout::kRows, kUnits = kPanelRows / G;  // units per panel
  const Weights& w = layout.w;
  const int64_t units = w.rows / G;
  std::vector<float> panel(kPanelRows * w.cols, 0.0f);  // rows past a short last group stay zero
  for (int64_t first = begin * kUnits; first < std::min(end * kUnits, units); first += kUnits) {
    int64_t rows[kPanelRows];
    int nrows = 0;
    for (int64_t u = first; u < std::min(first + kUnits, units); ++u, nrows += G) {
      Dequantize<Layout, BLOCK>(layout, u, panel.data() + nrows * w.cols);
      for (int g = 0; g < G; ++g) rows[nrows + g] = layout.Row(u, g);
    }
    PanelTiles<kPanelTile>(panel.data(), x, m, w.cols, rows, nrows, y, w.rows);
  }
}

// Units [begin, end) for every activation row, kTile rows per pass over the weights.
template <class Layout, int BLOCK>
void FewRowsChunk(const Layout& layout, const float* x, const float* xsum, int64_t m, float* y, int64_t begin,
                  int64_t end) {
  const Weights& w = layout.w;
  for (int64_t m0 = 0; m0 < m; m0 += kTile) {
    const float* xt = x + m0 * w.cols;
    const float* st = xsum + m0 * w.nblocks;
    float* yt = y + m0 * w.rows;
    switch (std::min<int64_t>(kTile, m - m0)) {
      case 1: FewRows<Layout, 1, BLOCK>(layout, xt, st, yt, begin, end); break;
      case 2: FewRows<Layout, 2, BLOCK>(layout, xt, st, yt, begin, end); break;
      case 3: FewRows<Layout, 3, BLOCK>(layout, xt, st, yt, begin, end); break;
      default: FewRows<Layout, 4, BLOCK>(layout, xt, st, yt, begin, end); break;
    }
  }
}

// Units [begin, end) of one weight: storage units (few activation rows) or panels of
// kPanelRows output rows (many). xsum: each activation block's sum, for few rows only.
template <class Layout, int BLOCK>
void RunUnits(const Layout& layout, const float* x, const float* xsum, int64_t m, float* y, int64_t begin,
              int64_t end) {
  if (m > kManyRows) {
    ManyRows<Layout, BLOCK>(layout, x, m, y, begin, end);
  } else {
    FewRowsChunk<Layout, BLOCK>(layout, x, xsum, m, y, begin, end);
  }
}

template <int BLOCK>
void RunUnits(const Weights& w, const float* x, const float* xsum, int64_t m, float* y, int64_t begin, int64_t end) {
  if (w.bits == 6) {
    RunUnits<Quads6, BLOCK>(Quads6{w}, x, xsum, m, y, begin, end);
  } else if (w.bits == 4) {
    RunUnits<Pairs4, BLOCK>(Pairs4{w}, x, xsum, m, y, begin, end);
  } else {
    RunUnits<Bytes8, BLOCK>(Bytes8{w}, x, xsum, m, y, begin, end);
  }
}

// The output rows one storage unit holds.
int64_t RowsPerUnit(const Weights& w) { return w.bits == 8 ? 1 : (w.bits == 4 ? 2 : 4); }

// How many units RunUnits splits a weight's work into for m activation rows.
int64_t WorkUnits(const Weights& w, int64_t m) {
  const int64_t units = w.rows / RowsPerUnit(w);
  if (m <= kManyRows) return units;
  const int64_t per_panel = kPanelRows / RowsPerUnit(w);
  return (units + per_panel - 1) / per_panel;
}

// ys[i] = x @ ws[i].T for every weight, their units split over the pool together: the
// pool's fixed cost per call (waking its threads and waiting for them, some microseconds)
// is paid once for a layer's q, k and v, say, instead of once per weight. Each output row
// is computed by one unit whatever the split, so the results equal one call per weight.
void Run(ffi::ThreadPool& pool, const std::vector<Weights>& ws, const float* x, int64_t m,
         const std::vector<float*>& ys) {
  std::vector<float> xsums[2];  // blocks of 16, of 32 (few rows only)
  std::vector<int64_t> first(ws.size() + 1, 0);  // each weight's first unit in the joint range
  for (size_t i = 0; i < ws.size(); ++i) {
    const Weights& w = ws[i];
    std::vector<float>& xsum = xsums[w.block == 32];
    if (m <= kManyRows && xsum.empty()) {
      xsum.assign(m * w.nblocks, 0.0f);
      for (int64_t j = 0; j < m * w.nblocks; ++j)
        for (int64_t c = 0; c < w.block; ++c) xsum[j] += x[j * w.block + c];
    }
    first[i + 1] = first[i] + WorkUnits(w, m);
  }
  const int64_t total = first.back();
  mrs::ParallelFor(pool, total, mrs::ChunksFor(pool, total, m > kManyRows ? 4 : 64), [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < ws.size(); ++i) {
      const int64_t lo = std::max(begin, first[i]) - first[i], hi = std::min(end, first[i + 1]) - first[i];
      if (lo >= hi) continue;
      const float* xsum = xsums[ws[i].block == 32].data();
      if (ws[i].block == 16) {
        RunUnits<16>(ws[i], x, xsum, m, ys[i], lo, hi);
      } else {
        RunUnits<32>(ws[i], x, xsum, m, ys[i], lo, hi);
      }
    }
  });
}

bool IsF16(ffi::DataType t) { return t == ffi::DataType::F16; }

// One weight's buffers (a QArray's data, scale, min and high) checked against x [m, k].
ffi::Error ReadWeights(int64_t k, const ffi::AnyBuffer& data, const ffi::AnyBuffer& scale, const ffi::AnyBuffer& min,
                       const ffi::AnyBuffer& high, int32_t bits, int32_t zero, Weights* w) {
  const auto dd = data.dimensions(), sd = scale.dimensions();
  if (dd.size() != 3 || sd.size() != 2)
    return ffi::Error::InvalidArgument("qmatmul: data must be [units, nblocks, block], scale [rows, nblocks]");
  const int64_t rows = sd[0], nblocks = sd[1], block = dd[2];
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
  *w = Weights{static_cast<const uint8_t*>(data.untyped_data()), static_cast<const uint8_t*>(high.untyped_data()),
               scale.untyped_data(), has_min ? min.untyped_data() : nullptr, is_int8, IsF16(scale.element_type()),
               IsF16(min.element_type()), bits, static_cast<int>(block), zero, rows, nblocks, k};
  return ffi::Error::Success();
}

// x [m, k] times each of n weights (four buffers each: data, scale, min, high; bits[i] and
// zero[i]) into n outputs [m, rows_i].
ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs weights, ffi::RemainingRets outs,
                   ffi::Span<const int32_t> bits, ffi::Span<const int32_t> zero) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("qmatmul: x must be [m, k]");
  const int64_t m = xd[0], k = xd[1];
  const size_t n = outs.size();
  if (n == 0 || weights.size() != 4 * n || bits.size() != n || zero.size() != n)
    return ffi::Error::InvalidArgument("qmatmul: four buffers, a bits and a zero per output");
  std::vector<Weights> ws(n);
  std::vector<float*> ys(n);
  for (size_t i = 0; i < n; ++i) {
    ffi::ErrorOr<ffi::AnyBuffer> buffers[4] = {weights.get<ffi::AnyBuffer>(4 * i), weights.get<ffi::AnyBuffer>(4 * i + 1),
                                               weights.get<ffi::AnyBuffer>(4 * i + 2),
                                               weights.get<ffi::AnyBuffer>(4 * i + 3)};
    for (const auto& b : buffers)
      if (b.has_error()) return b.error();
    if (ffi::Error e = ReadWeights(k, *buffers[0], *buffers[1], *buffers[2], *buffers[3], bits[i], zero[i], &ws[i]);
        e.failure())
      return e;
    auto y = outs.get<ffi::Buffer<ffi::F32>>(i);
    if (y.has_error()) return y.error();
    const auto yd = (*y)->dimensions();
    if (yd.size() != 2 || yd[0] != m || yd[1] != ws[i].rows)
      return ffi::Error::InvalidArgument("qmatmul: each output must be [m, rows]");
    ys[i] = (*y)->typed_data();
  }
  Run(pool, ws, x.typed_data(), m, ys);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MrsQMatmul, QMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int32_t>>("bits")
                                  .Attr<ffi::Span<const int32_t>>("zero"));
