// Packing of a matrix into the column panels the micro-kernel reads (see PackedPanels).
#pragma once

#include <algorithm>
#include <cstring>
#include <vector>

#include "fastrnn/buffer.h"
#include "fastrnn/kernels.h"

namespace fastrnn {

inline long round_up(long value, long multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Allocates a rows x cols matrix of panels in storage (cols rounded up to lanes) and calls
// fill(panel, col0, width) for each: the panel of columns [col0, col0 + width), `width` values
// per row. Every packer below lays its matrix out through this one loop.
template <class T, class Fill>
PackedPanels<T> pack_into_panels(AlignedBuffer<T>& storage, long rows, long cols, long panel_width,
                                 long lanes, Fill fill) {
  const long padded_cols = round_up(cols, lanes);
  storage.reset(static_cast<std::size_t>(rows * padded_cols));
  T* out = storage.data();
  for (long col0 = 0; col0 < padded_cols; col0 += panel_width) {
    const long width = padded_cols - col0 < panel_width ? padded_cols - col0 : panel_width;
    fill(out + col0 * rows, col0, width);  // earlier panels are all full: col0 / panel_width
  }
  return {out, rows, padded_cols, panel_width};
}

// A square block of kTransposeLanes x kTransposeLanes values, transposed in 16-byte vectors (the
// baseline's SSE2 or NEON registers: GCC and Clang lower the shuffles to unpack instructions).
template <class T>
constexpr long kTransposeLanes = 16 / static_cast<long>(sizeof(T));

// to[i * to_stride + r] = from[r][i] for r, i < kTransposeLanes.
template <class T>
inline void transpose_block(const T* const (&from)[kTransposeLanes<T>], T* to, long to_stride) {
  typedef T Vec __attribute__((vector_size(16)));
  Vec v[kTransposeLanes<T>];
  for (long r = 0; r < kTransposeLanes<T>; ++r) std::memcpy(&v[r], from[r], sizeof(Vec));
  if constexpr (kTransposeLanes<T> == 4) {
    const Vec low01 = __builtin_shufflevector(v[0], v[1], 0, 4, 1, 5);
    const Vec high01 = __builtin_shufflevector(v[0], v[1], 2, 6, 3, 7);
    const Vec low23 = __builtin_shufflevector(v[2], v[3], 0, 4, 1, 5);
    const Vec high23 = __builtin_shufflevector(v[2], v[3], 2, 6, 3, 7);
    v[0] = __builtin_shufflevector(low01, low23, 0, 1, 4, 5);
    v[1] = __builtin_shufflevector(low01, low23, 2, 3, 6, 7);
    v[2] = __builtin_shufflevector(high01, high23, 0, 1, 4, 5);
    v[3] = __builtin_shufflevector(high01, high23, 2, 3, 6, 7);
  } else {
    static_assert(kTransposeLanes<T> == 2, "float or double");
    const Vec low = __builtin_shufflevector(v[0], v[1], 0, 2);
    v[1] = __builtin_shufflevector(v[0], v[1], 1, 3);
    v[0] = low;
  }
  for (long i = 0; i < kTransposeLanes<T>; ++i) std::memcpy(to + i * to_stride, &v[i], sizeof(Vec));
}

// Packs a transposed gather: column j of the k_count x cols matrix is row row_of[j] of src (rows
// of at least k_count values, src_stride apart; row_of nullptr: row j; < 0: zeros). A panel's rows
// kBlock at a time, each a block of kBlock values from every source row of the panel's columns,
// transposed in vectors: it writes whole panel rows, and reads each source row a vector at a time
// while the lines it touches stay in L1 (as many lines as the panel has columns). After a weight
// update every layer repacks. Packing an LSTM(512, 512) for inference (both matrices transposed,
// two threads, alternating processes) took 0.75-1.14 ms by tiles of 16 x 16 values copied one by
// one, 0.52-0.54 ms this way; an LSTM(1024, 1024) 5.8-6.1 and 3.2-4.4 ms.
template <class T>
PackedPanels<T> pack_transposed_rows(AlignedBuffer<T>& storage, const T* src, long src_stride,
                                     long k_count, const long* row_of, long cols, long panel_width,
                                     long lanes) {
  constexpr long kBlock = kTransposeLanes<T>;
  const std::vector<T> zeros(static_cast<std::size_t>(k_count), T(0));  // a padding column's row
  std::vector<const T*> rows(static_cast<std::size_t>(panel_width));    // each column's source
  return pack_into_panels(storage, k_count, cols, panel_width, lanes,
                          [&](T* panel, long col0, long width) {
                            for (long j = 0; j < width; ++j) {
                              const long col = col0 + j;
                              const long row = col >= cols ? -1 : row_of ? row_of[col] : col;
                              rows[j] = row >= 0 ? src + row * src_stride : zeros.data();
                            }
                            const long full_width = width / kBlock * kBlock;
                            long k = 0;
                            for (; k + kBlock <= k_count; k += kBlock) {
                              for (long j0 = 0; j0 < full_width; j0 += kBlock) {
                                const T* from[kBlock];
                                for (long j = 0; j < kBlock; ++j) from[j] = rows[j0 + j] + k;
                                transpose_block<T>(from, panel + k * width + j0, width);
                              }
                              for (long kk = k; kk < k + kBlock; ++kk)
                                for (long j = full_width; j < width; ++j)
                                  panel[kk * width + j] = rows[j][kk];
                            }
                            for (; k < k_count; ++k)
                              for (long j = 0; j < width; ++j) panel[k * width + j] = rows[j][k];
                          });
}

// Packs a row gather: row k of the rows x cols matrix is row row_of[k] of src (row_of nullptr:
// row k; < 0: zeros), its columns past src_cols zeros. Each panel row is a contiguous piece of a
// source row: a plain copy.
template <class T>
PackedPanels<T> pack_gathered_rows(AlignedBuffer<T>& storage, const T* src, long src_stride,
                                   long src_cols, const long* row_of, long rows, long cols,
                                   long panel_width, long lanes) {
  return pack_into_panels(
      storage, rows, cols, panel_width, lanes, [&](T* panel, long col0, long width) {
        const long copied =
            src_cols - col0 < width ? (src_cols > col0 ? src_cols - col0 : 0) : width;
        for (long k = 0; k < rows; ++k) {
          T* to = panel + k * width;
          const long row = row_of ? row_of[k] : k;
          if (row >= 0)
            std::memcpy(to, src + row * src_stride + col0,
                        static_cast<std::size_t>(copied) * sizeof(T));
          std::fill(to + (row >= 0 ? copied : 0), to + width, T(0));
        }
      });
}

// The row of torch.nn's (G*H, .) weight behind packed gate column `col`, or -1 for padding.
inline long torch_row_of_gate_column(const Layout& L, long col) {
  const long block = L.gates * L.panel_hidden;
  const long rem = col % block;
  const long j = (col / block) * L.panel_hidden + rem % L.panel_hidden;
  return j < L.hidden ? (rem / L.panel_hidden) * L.hidden + j : -1;
}

}  // namespace fastrnn
