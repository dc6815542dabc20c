// Exact per-class average precision on the CPU: a radix sort of 32-bit order-preserving keys per class.
//
// The sum is the one bgtrain/metrics.py computes on other devices, in the same order, so both give bit-identical
// AP: for each positive, in ascending score order, add precision = TP(>= s) / Known(>= s), where tied entries all
// count (scikit-learn's rule of evaluating at distinct thresholds only). Unknown entries (label -1) are dropped.
//
// Why a radix sort: a class is ~10^5 float32 scores; a comparison sort costs ~3 ms there, three 11-bit LSD passes
// over the keys ~0.3 ms. Classes are read in tiles of adjacent columns, so an (N, C) row-major matrix is read one
// cache line per row and tile instead of one line per element.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace bgtrain {
namespace {

constexpr int kDigitBits = 11;
constexpr uint32_t kBuckets = 1u << kDigitBits;
constexpr int64_t kTileBytes = int64_t(1) << 24;  // key storage per tile: bounds memory for very large N
constexpr int64_t kMaxTile = 16;                   // 16 float32 = one 64-byte cache line of a row

// Unsigned key whose order is the float order; -0.0 and +0.0 compare equal, so they share a key.
inline uint32_t ascending_key(float f) {
  if (f == 0.0f) f = 0.0f;
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr int kPasses = (32 + kDigitBits - 1) / kDigitBits;

// Digit histograms of every LSD pass, filled while the keys are written so the sort needs no counting pass.
struct Histograms {
  std::vector<uint32_t> counts = std::vector<uint32_t>(kPasses * kBuckets);
  void clear() { std::fill(counts.begin(), counts.end(), 0u); }
  void add(uint32_t key) {
    for (int p = 0; p < kPasses; ++p) ++counts[p * kBuckets + ((key >> (p * kDigitBits)) & (kBuckets - 1))];
  }
};

// LSD radix sort of keys[0, n) using tmp[0, n) and the keys' histograms (consumed); returns whichever buffer holds
// the sorted keys. A pass whose digit is the same for every key is skipped (scores in (0, 1) share their top bits).
uint32_t* radix_sort(uint32_t* keys, uint32_t* tmp, int64_t n, Histograms& hist) {
  uint32_t* src = keys;
  uint32_t* dst = tmp;
  for (int p = 0; p < kPasses; ++p) {
    uint32_t* h = hist.counts.data() + p * kBuckets;
    const int shift = p * kDigitBits;
    if (n == 0 || h[(src[0] >> shift) & (kBuckets - 1)] == static_cast<uint32_t>(n)) continue;
    uint32_t offset = 0;
    for (uint32_t b = 0; b < kBuckets; ++b) {
      const uint32_t count = h[b];
      h[b] = offset;
      offset += count;
    }
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t k = src[i];
      dst[h[(k >> shift) & (kBuckets - 1)]++] = k;
    }
    std::swap(src, dst);
  }
  return src;
}

// out[t * N + i] = in[i * row + t * col] for t < width: row blocks small enough that the rows' cache lines stay in
// L1 while each class's run is written out contiguously.
template <typename T>
void copy_tile(const T* in, int64_t row, int64_t col, int64_t N, int64_t width, T* out) {
  constexpr int64_t kRows = 256;
  for (int64_t i0 = 0; i0 < N; i0 += kRows) {
    const int64_t i1 = std::min(N, i0 + kRows);
    for (int64_t t = 0; t < width; ++t) {
      const T* src = in + t * col;
      T* dst = out + t * N;
      for (int64_t i = i0; i < i1; ++i) dst[i] = src[i * row];
    }
  }
}

// Sum over positives of precision at their score, in ascending score order (see the file comment).
double precision_sum(const uint32_t* known, int64_t n_known, const uint32_t* pos, int64_t n_pos) {
  double sum = 0.0;
  int64_t known_below = 0, pos_below = 0;
  for (int64_t j = 0; j < n_pos;) {
    const uint32_t key = pos[j];
    int64_t ties = 0;
    while (j < n_pos && pos[j] == key) ++j, ++ties;
    while (known_below < n_known && known[known_below] < key) ++known_below;
    const double precision = static_cast<double>(n_pos - pos_below) / static_cast<double>(n_known - known_below);
    for (int64_t t = 0; t < ties; ++t) sum += precision;  // one addition per positive, as the torch path does
    pos_below += ties;
  }
  return sum;
}

}  // namespace

// scores (N, C) float32 and labels (N, C) int8 (1 positive, 0 negative, -1 unknown), any strides.
// Returns (precision sums float64 (C,), positives int64 (C,), known int64 (C,), whether any score is NaN);
// AP = sum / positives. The caller turns a NaN into its own error (metrics.py), so it is reported, not thrown.
std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> ap_sums_cpu(const at::Tensor& scores, const at::Tensor& labels) {
  TORCH_CHECK(scores.dim() == 2 && scores.sizes() == labels.sizes(), "ap_sums: scores ", scores.sizes(),
              " and labels ", labels.sizes(), " must both be (N, C)");
  TORCH_CHECK(scores.device().is_cpu() && labels.device().is_cpu(), "ap_sums: CPU tensors only");
  TORCH_CHECK(scores.scalar_type() == at::kFloat, "ap_sums: scores must be float32, got ", scores.scalar_type());
  TORCH_CHECK(labels.scalar_type() == at::kChar, "ap_sums: labels must be int8, got ", labels.scalar_type());
  const int64_t N = scores.size(0), C = scores.size(1);
  auto sums = at::zeros({C}, scores.options().dtype(at::kDouble));
  auto n_pos = at::zeros({C}, scores.options().dtype(at::kLong));
  auto n_known = at::zeros({C}, scores.options().dtype(at::kLong));
  if (C == 0) return {sums, n_pos, n_known, false};

  const float* s = scores.data_ptr<float>();
  const int8_t* l = labels.data_ptr<int8_t>();
  const int64_t s_row = scores.stride(0), s_col = scores.stride(1);
  const int64_t l_row = labels.stride(0), l_col = labels.stride(1);
  double* sum_out = sums.data_ptr<double>();
  int64_t* pos_out = n_pos.data_ptr<int64_t>();
  int64_t* known_out = n_known.data_ptr<int64_t>();
  // A class-major input (unit row stride) is read in place; otherwise tiles of adjacent classes are first copied
  // out row by row, which reads each row's tile as one cache line.
  const bool class_major = s_row == 1 && l_row == 1;
  const int64_t tile =
      class_major ? 1 : std::clamp<int64_t>(kTileBytes / (5 * std::max<int64_t>(N, 1)), 1, kMaxTile);
  const int64_t tiles = (C + tile - 1) / tile;
  std::atomic<bool> saw_nan{false};

  // Tiles cost the same, so parallel_for's equal contiguous chunks balance them.
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile_scores(class_major ? 0 : tile * N);
    std::vector<int8_t> tile_labels(class_major ? 0 : tile * N);
    std::vector<uint32_t> known(N), known_tmp(N), pos(N), pos_tmp(N);
    Histograms known_hist, pos_hist;
    for (int64_t t0 = begin; t0 < end; ++t0) {
      const int64_t c0 = t0 * tile, width = std::min(tile, C - c0);
      if (!class_major) {
        copy_tile(s + c0 * s_col, s_row, s_col, N, width, tile_scores.data());
        copy_tile(l + c0 * l_col, l_row, l_col, N, width, tile_labels.data());
      }
      for (int64_t t = 0; t < width; ++t) {
        const float* sc = class_major ? s + (c0 + t) * s_col : tile_scores.data() + t * N;
        const int8_t* lc = class_major ? l + (c0 + t) * l_col : tile_labels.data() + t * N;
        known_hist.clear();
        pos_hist.clear();
        int64_t nk = 0, np = 0;
        bool nan = false;
        for (int64_t i = 0; i < N; ++i) {
          const uint32_t key = ascending_key(sc[i]);
          nan |= std::isnan(sc[i]);
          // Branch-free appends: the slot is always written, the count only moves for the right labels.
          known[nk] = key;
          pos[np] = key;
          if (lc[i] >= 0) known_hist.add(key);
          if (lc[i] == 1) pos_hist.add(key);
          nk += lc[i] >= 0;
          np += lc[i] == 1;
        }
        if (nan) saw_nan = true;
        const uint32_t* k = radix_sort(known.data(), known_tmp.data(), nk, known_hist);
        const uint32_t* p = radix_sort(pos.data(), pos_tmp.data(), np, pos_hist);
        sum_out[c0 + t] = precision_sum(k, nk, p, np);
        pos_out[c0 + t] = np;
        known_out[c0 + t] = nk;
      }
    }
  });
  return {sums, n_pos, n_known, saw_nan.load()};
}

}  // namespace bgtrain

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ap_sums", &bgtrain::ap_sums_cpu, py::call_guard<py::gil_scoped_release>(),
        "per-class (precision sum, positives, known, any NaN) for exact AP");
}
