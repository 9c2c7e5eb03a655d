// CPU implementations of the data-moving ops (see dp_cpu.h). No torch headers here.
#include "dp_cpu.h"

#include <cstring>

namespace dp_cpu {

namespace {

uint32_t bits_of(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

float float_of(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}

// Storage type T, accumulator Acc; load widens exactly, store rounds to nearest-even.
struct F32 {
  using T = float;
  using Acc = float;
  static Acc load(T v) { return v; }
  static T store(Acc v) { return v; }
};
struct F64 {
  using T = double;
  using Acc = double;
  static Acc load(T v) { return v; }
  static T store(Acc v) { return v; }
};
struct BF16 {
  using T = uint16_t;
  using Acc = float;
  static Acc load(T v) { return bf16_to_float(v); }
  static T store(Acc v) { return float_to_bf16(v); }
};
struct F16 {
  using T = uint16_t;
  using Acc = float;
  static Acc load(T v) { return half_to_float(v); }
  static T store(Acc v) { return float_to_half(v); }
};

template <typename E>
void scatter_add_impl(void* out_, const void* src_, const int64_t* order, const int64_t* offsets,
                      int64_t row_begin, int64_t row_end, int64_t cols) {
  using T = typename E::T;
  using Acc = typename E::Acc;
  T* out = static_cast<T*>(out_);
  const T* src = static_cast<const T*>(src_);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t lo = offsets[row], hi = offsets[row + 1];
    if (lo == hi) continue;
    T* o = out + row * cols;
    for (int64_t c = 0; c < cols; ++c) {
      Acc acc = E::load(o[c]);
      for (int64_t j = lo; j < hi; ++j) {
        const Acc term = E::load(src[order[j] * cols + c]);
        acc = acc + term;
      }
      o[c] = E::store(acc);
    }
  }
}

template <typename Index>
void gather_impl(void* out, const void* src, const Index* index, int64_t row_begin,
                 int64_t row_end, int64_t row_bytes) {
  auto* o = static_cast<unsigned char*>(out);
  auto* s = static_cast<const unsigned char*>(src);
  for (int64_t row = row_begin; row < row_end; ++row) {
    std::memcpy(o + row * row_bytes, s + static_cast<int64_t>(index[row]) * row_bytes,
                static_cast<size_t>(row_bytes));
  }
}

}  // namespace

float bf16_to_float(uint16_t bits) { return float_of(static_cast<uint32_t>(bits) << 16); }

uint16_t float_to_bf16(float value) {
  uint32_t x = bits_of(value);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>(x >> 16);
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return float_of(sign | 0x7f800000u | (mantissa << 13));
  return float_of(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

uint16_t float_to_half(float value) {
  const uint32_t x = bits_of(value);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) {  // inf, NaN (quieted, payload kept where it fits)
    return static_cast<uint16_t>(sign | (a > 0x7f800000u ? 0x7e00u | ((a >> 13) & 0x3ffu) : 0x7c00u));
  }
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 -> inf
  if (a < 0x38800000u) {                                                // below 2^-14
    if (a <= 0x33000000u) return sign;  // <= 2^-25: ties-to-even gives zero
    const uint32_t e = a >> 23;
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // in [14, 24]
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  uint32_t h = (a - 0x38000000u) >> 13;  // rebias 127 -> 15
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // carry may reach inf: correct
  return static_cast<uint16_t>(sign | h);
}

void copy(void* dst, const void* src, int64_t nbytes) {
  if (nbytes > 0) std::memcpy(dst, src, static_cast<size_t>(nbytes));
}

void gather_rows(void* out, const void* src, const void* index, bool index_is_int64,
                 int64_t row_begin, int64_t row_end, int64_t row_bytes) {
  if (index_is_int64) {
    gather_impl(out, src, static_cast<const int64_t*>(index), row_begin, row_end, row_bytes);
  } else {
    gather_impl(out, src, static_cast<const int32_t*>(index), row_begin, row_end, row_bytes);
  }
}

bool scatter_add_rows_csr(void* out, const void* src, const int64_t* order, const int64_t* offsets,
                          int64_t row_begin, int64_t row_end, int64_t cols, int dtype) {
  switch (dtype) {
    case kFloat32: scatter_add_impl<F32>(out, src, order, offsets, row_begin, row_end, cols); return true;
    case kFloat64: scatter_add_impl<F64>(out, src, order, offsets, row_begin, row_end, cols); return true;
    case kBFloat16: scatter_add_impl<BF16>(out, src, order, offsets, row_begin, row_end, cols); return true;
    case kFloat16: scatter_add_impl<F16>(out, src, order, offsets, row_begin, row_end, cols); return true;
    default: return false;
  }
}

}  // namespace dp_cpu
