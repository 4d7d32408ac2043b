// Packing of a matrix into the column panels the micro-kernel reads (see PackedPanels).
#pragma once

#include <algorithm>
#include <cstring>

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

// Packs a transposed gather: column j of the k_count x cols matrix is row row_of[j] of src (rows
// of at least k_count values, src_stride apart; row_of nullptr: row j; < 0: zeros). A tile of
// kGroup columns x kBlock values of k at a time: it reads a whole line from each of kGroup rows
// (one element per row and step would touch a line per element, and rows a power of two apart
// all land in the same few L1 sets), so the prefetchers follow kGroup streams, not a whole
// panel's columns, and it writes each panel row's kGroup values together. After a weight update
// every layer repacks: an LSTM(512, 512) call at T=25, B=4 cost 3.0-3.6 ms more after one than
// without, 1.8-2.2 ms by tiles; packing an LSTM(1024, 1024) for inference took 7.0-12.0 ms, 5.0-5.3
// by tiles (two threads, alternating processes).
template <class T>
PackedPanels<T> pack_transposed_rows(AlignedBuffer<T>& storage, const T* src, long src_stride,
                                     long k_count, const long* row_of, long cols, long panel_width,
                                     long lanes) {
  constexpr long kBlock = 16;
  constexpr long kGroup = 16;
  return pack_into_panels(storage, k_count, cols, panel_width, lanes,
                          [&](T* panel, long col0, long width) {
                            T tile[kGroup][kBlock];
                            for (long j0 = 0; j0 < width; j0 += kGroup) {
                              const long group = std::min(kGroup, width - j0);
                              for (long k0 = 0; k0 < k_count; k0 += kBlock) {
                                const long block = std::min(kBlock, k_count - k0);
                                for (long j = 0; j < group; ++j) {
                                  const long col = col0 + j0 + j;
                                  const long row = col >= cols ? -1 : row_of ? row_of[col] : col;
                                  if (row >= 0)
                                    std::memcpy(tile[j], src + row * src_stride + k0,
                                                static_cast<std::size_t>(block) * sizeof(T));
                                  else
                                    std::fill(tile[j], tile[j] + block, T(0));
                                }
                                for (long kk = 0; kk < block; ++kk)
                                  for (long j = 0; j < group; ++j)
                                    panel[(k0 + kk) * width + j0 + j] = tile[j][kk];
                              }
                            }
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
