// Packing of a matrix into the column panels the micro-kernel reads (see PackedPanels).
#pragma once

#include "fastrnn/buffer.h"
#include "fastrnn/kernels.h"

namespace fastrnn {

inline long round_up(long value, long multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Packs a rows x cols matrix given element-wise by value(k, j) into panels of panel_width columns
// (the last panel narrower, padded with zeros to a multiple of lanes).
template <class T, class ValueAt>
PackedPanels<T> pack_panels(AlignedBuffer<T>& storage, long rows, long cols, long panel_width,
                            long lanes, ValueAt value) {
  const long padded_cols = round_up(cols, lanes);
  storage.reset(static_cast<std::size_t>(rows * padded_cols));
  T* out = storage.data();
  for (long col0 = 0; col0 < padded_cols; col0 += panel_width) {
    const long width = padded_cols - col0 < panel_width ? padded_cols - col0 : panel_width;
    T* panel = out + col0 * rows;  // earlier panels are all full: col0 / panel_width of them
    for (long k = 0; k < rows; ++k)
      for (long jj = 0; jj < width; ++jj)
        panel[k * width + jj] = col0 + jj < cols ? value(k, col0 + jj) : T(0);
  }
  return {out, rows, padded_cols, panel_width};
}

// The row of torch.nn's (G*H, .) weight behind packed gate column `col`, or -1 for padding.
inline long torch_row_of_gate_column(const Layout& L, long col) {
  const long block = L.gates * L.panel_hidden;
  const long rem = col % block;
  const long j = (col / block) * L.panel_hidden + rem % L.panel_hidden;
  return j < L.hidden ? (rem / L.panel_hidden) * L.hidden + j : -1;
}

}  // namespace fastrnn
