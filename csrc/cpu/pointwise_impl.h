// The vectorized pointwise passes of one instruction set (see pointwise.h). A translation unit defines
// LSTMFAST_ISA (its namespace), LSTMFAST_VEC_BYTES (its vector width) and LSTMFAST_ISA_SUPPORTED (a
// runtime CPU check), includes every header it needs, switches the compiler's target, and then includes
// this file, so that everything compiled for that target lives in the ISA's own namespace.
//
// exp and tanh are Cephes' algorithms (Moshier), branch-free over GCC vector extensions: float32 within
// about 2 ulp, float64 within about 2 ulp, so the layer stays within the tests' tolerances of torch.
// No -ffast-math: the round-to-nearest trick below relies on exact IEEE additions.
namespace lstmfast::cpu::LSTMFAST_ISA {
namespace {

using kernels::GruBackwardStep;
using kernels::GruForwardStep;
using kernels::LstmBackwardStep;
using kernels::LstmForwardStep;
using kernels::Nonlinearity;
using kernels::RnnBackwardStep;
using kernels::RnnForwardStep;
using kernels::SumStep;

typedef float vfloat __attribute__((vector_size(LSTMFAST_VEC_BYTES)));
typedef int32_t vint32 __attribute__((vector_size(LSTMFAST_VEC_BYTES)));
typedef double vdouble __attribute__((vector_size(LSTMFAST_VEC_BYTES)));
typedef int64_t vint64 __attribute__((vector_size(LSTMFAST_VEC_BYTES)));

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  using type = vfloat;
};
template <>
struct VecOf<double> {
  using type = vdouble;
};

template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kLanes = LSTMFAST_VEC_BYTES / sizeof(T);

template <typename V, typename S>
inline V splat(S s) {
  return V{} + s;
}

// Loads n <= lanes elements (the rest zero), stores n elements.
template <typename T>
inline Vec<T> load(const T* p, int64_t n) {
  Vec<T> v{};
  if (n == kLanes<T>) {
    __builtin_memcpy(&v, p, sizeof(v));
  } else {
    for (int64_t l = 0; l < n; ++l) v[l] = p[l];
  }
  return v;
}

template <typename T>
inline void store(T* p, Vec<T> v, int64_t n) {
  if (n == kLanes<T>) {
    __builtin_memcpy(p, &v, sizeof(v));
  } else {
    for (int64_t l = 0; l < n; ++l) p[l] = v[l];
  }
}

template <typename V>
inline V select(decltype(V{} < V{}) mask, V a, V b) {
  return mask ? a : b;
}

template <typename T>
inline T horizontal_sum(Vec<T> v) {
  T s = 0;
  for (int64_t l = 0; l < kLanes<T>; ++l) s += v[l];
  return s;
}

inline vfloat exp_in_range(vfloat x);
inline vdouble exp_in_range(vdouble x);

// e^x like libm at the ends: +inf above the range where 2^n is a normal float, 0 below it, NaN
// passes through (so sigmoid(-inf) = 0 and NaN/Inf propagate as in torch). Inside, Cephes.
inline vfloat exp(vfloat x) {
  const vfloat overflow = select(x > 88.3762626647949f, splat<vfloat>(__builtin_inff()), vfloat{});
  const auto underflow = x < -87.3365478515625f;
  x = select(x > 88.3762626647949f, splat<vfloat>(88.3762626647949f), x);
  x = select(underflow, splat<vfloat>(-87.3365478515625f), x);
  return select(underflow, vfloat{}, exp_in_range(x) + overflow);
}

inline vfloat exp_in_range(vfloat x) {
  // n = round(x / ln 2): adding 1.5 * 2^23 rounds to an integer, which the low mantissa bits hold.
  const float magic = 12582912.0f;
  const vfloat t = x * 1.44269504088896341f + magic;
  const vint32 n_bits = reinterpret_cast<vint32>(t) - reinterpret_cast<vint32>(splat<vfloat>(magic));
  const vfloat n = t - magic;
  vfloat r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const vfloat z = r * r;
  vfloat p = splat<vfloat>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  const vint32 scale = (n_bits + 127) << 23;
  return p * reinterpret_cast<vfloat>(scale);
}

inline vdouble exp(vdouble x) {
  const vdouble overflow = select(x > 709.0, splat<vdouble>(__builtin_inf()), vdouble{});
  const auto underflow = x < -708.3964185322641;
  x = select(x > 709.0, splat<vdouble>(709.0), x);
  x = select(underflow, splat<vdouble>(-708.3964185322641), x);
  return select(underflow, vdouble{}, exp_in_range(x) + overflow);
}

inline vdouble exp_in_range(vdouble x) {
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  const vdouble t = x * 1.4426950408889634073599 + magic;
  const vint64 n_bits = reinterpret_cast<vint64>(t) - reinterpret_cast<vint64>(splat<vdouble>(magic));
  const vdouble n = t - magic;
  vdouble r = x - n * 6.93145751953125e-1;
  r = r - n * 1.42860682030941723212e-6;
  // e^r = 1 + 2 r P(r^2) / (Q(r^2) - r P(r^2)), a Pade form.
  const vdouble rr = r * r;
  const vdouble px =
      r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr + 9.99999999999999999910e-1);
  const vdouble qx = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr +
                      2.27265548208155028766e-1) * rr + 2.00000000000000000009e0;
  const vdouble e = 1.0 + 2.0 * (px / (qx - px));
  const vint64 scale = (n_bits + 1023) << 52;
  return e * reinterpret_cast<vdouble>(scale);
}

// tanh: an odd polynomial (float) or rational function (double) near zero, 1 - 2 / (e^{2|x|} + 1)
// with x's sign elsewhere.
inline vfloat tanh(vfloat x) {
  const vfloat ax = select(x < 0.0f, -x, x);
  const vfloat z = x * x;
  vfloat p = splat<vfloat>(-5.70498872745e-3f);
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const vfloat small = p * z * x + x;
  const vfloat big = 1.0f - 2.0f / (exp(ax + ax) + 1.0f);
  return select(x == 0.0f, x, select(ax < 0.625f, small, select(x < 0.0f, -big, big)));  // tanh(-0) = -0
}

inline vdouble tanh(vdouble x) {
  const vdouble ax = select(x < 0.0, -x, x);
  const vdouble z = x * x;
  const vdouble p = (-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z -
                    1.61468768441708447952e3;
  const vdouble q = ((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z +
                    4.84406305325125486048e3;
  const vdouble small = x + x * z * (p / q);
  const vdouble big = 1.0 - 2.0 / (exp(ax + ax) + 1.0);
  return select(x == 0.0, x, select(ax < 0.625, small, select(x < 0.0, -big, big)));  // tanh(-0) = -0
}

template <typename V>
inline V sigmoid(V x) {
  return 1 / (1 + exp(-x));
}

// Clamps into [-c, c]; c <= 0 means no clipping.
template <typename V, typename S>
inline V clip(V x, S c) {
  if (c <= 0) return x;
  x = select(x > c, splat<V>(c), x);
  return select(x < -c, splat<V>(-c), x);
}

template <typename T>
void lstm_forward(const LstmForwardStep<T>& s, int64_t begin, int64_t end) {
  const int64_t H = s.hidden_size;
  for (int64_t b = begin; b < end; ++b) {
    T* a = s.gates + b * 4 * H;
    for (int64_t j = 0; j < H; j += kLanes<T>) {
      const int64_t n = std::min<int64_t>(kLanes<T>, H - j), e = b * H + j;
      Vec<T> a_i = load(a + j, n), a_f = load(a + H + j, n), a_g = load(a + 2 * H + j, n),
             a_o = load(a + 3 * H + j, n);
      if (s.bias != nullptr) {
        a_i += load(s.bias + j, n);
        a_f += load(s.bias + H + j, n);
        a_g += load(s.bias + 2 * H + j, n);
        a_o += load(s.bias + 3 * H + j, n);
      }
      const Vec<T> i = sigmoid(a_i), f = sigmoid(a_f), g = tanh(a_g), o = sigmoid(a_o);
      const Vec<T> cell = f * load(s.cell_state + e, n) + i * g;
      const Vec<T> hidden = o * tanh(cell);
      if (s.save_gates) {
        store(a + j, i, n);
        store(a + H + j, f, n);
        store(a + 2 * H + j, g, n);
        store(a + 3 * H + j, o, n);
      }
      store(s.cell_state + e, cell, n);
      if (s.cells != nullptr) store(s.cells + e, cell, n);
      store(s.hidden + e, hidden, n);
      if (s.hidden_state != nullptr) store(s.hidden_state + e, hidden, n);
    }
  }
}

template <typename T>
void copy_prev_hidden(const kernels::PrevHidden<T>& p, int64_t b) {
  if (p.out == nullptr) return;
  const T* from = b < p.split ? p.from_prev : p.initial;
  __builtin_memcpy(p.out + b * p.width, from + b * p.width, p.width * sizeof(T));
}

template <typename T>
void lstm_backward(const LstmBackwardStep<T>& s, int64_t begin, int64_t end, T* hidden_norm,
                   T* cell_norm) {
  const int64_t H = s.hidden_size;
  const T grad_clip = static_cast<T>(s.grad_clip);
  for (int64_t b = begin; b < end; ++b) {
    const T* a = s.gates + b * 4 * H;
    T* d = s.grad_gates + b * 4 * H;
    const T* cell_prev_row = b < s.split ? s.cell_prev : s.cell_initial;
    Vec<T> hidden_sq{}, cell_sq{};
    for (int64_t j = 0; j < H; j += kLanes<T>) {
      const int64_t n = std::min<int64_t>(kLanes<T>, H - j), e = b * H + j;
      Vec<T> grad_hidden = load(s.grad_hidden + e, n);
      if (s.grad_hidden_extra != nullptr) grad_hidden += load(s.grad_hidden_extra + e, n);
      const Vec<T> i = load(a + j, n), f = load(a + H + j, n), g = load(a + 2 * H + j, n),
                   o = load(a + 3 * H + j, n);
      const Vec<T> cell_prev = load(cell_prev_row + e, n);
      const Vec<T> tanh_cell = tanh(load(s.cells + e, n));
      // The same expressions, in the same order, as kernels::lstm_cell_backward.
      const Vec<T> cell = load(s.grad_cell_state + e, n) + grad_hidden * o * (1 - tanh_cell * tanh_cell);
      store(d + j, clip(cell * g * i * (1 - i), grad_clip), n);
      store(d + H + j, clip(cell * cell_prev * f * (1 - f), grad_clip), n);
      store(d + 2 * H + j, clip(cell * i * (1 - g * g), grad_clip), n);
      store(d + 3 * H + j, clip(grad_hidden * tanh_cell * o * (1 - o), grad_clip), n);
      store(s.grad_cell_state + e, cell * f, n);
      hidden_sq += grad_hidden * grad_hidden;
      cell_sq += cell * cell;
    }
    copy_prev_hidden(s.prev_hidden, b);
    if (hidden_norm != nullptr) hidden_norm[b] = horizontal_sum<T>(hidden_sq);
    if (cell_norm != nullptr) cell_norm[b] = horizontal_sum<T>(cell_sq);
  }
}

template <typename T>
void rnn_forward(const RnnForwardStep<T>& s, int64_t begin, int64_t end) {
  const int64_t H = s.hidden_size;
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t j = 0; j < H; j += kLanes<T>) {
      const int64_t n = std::min<int64_t>(kLanes<T>, H - j), e = b * H + j;
      Vec<T> a = load(s.hidden + e, n);
      if (s.bias != nullptr) a += load(s.bias + j, n);
      // relu as torch computes it: NaN stays NaN.
      const Vec<T> h = s.nonlinearity == Nonlinearity::Tanh ? tanh(a) : select(a < 0, Vec<T>{}, a);
      store(s.hidden + e, h, n);
      store(s.hidden_state + e, h, n);
    }
  }
}

template <typename T>
void rnn_backward(const RnnBackwardStep<T>& s, int64_t begin, int64_t end, T* hidden_norm) {
  const int64_t H = s.hidden_size;
  const T grad_clip = static_cast<T>(s.grad_clip);
  for (int64_t b = begin; b < end; ++b) {
    Vec<T> hidden_sq{};
    for (int64_t j = 0; j < H; j += kLanes<T>) {
      const int64_t n = std::min<int64_t>(kLanes<T>, H - j), e = b * H + j;
      const Vec<T> grad_hidden = load(s.grad_hidden + e, n) + load(s.grad_hidden_extra + e, n);
      const Vec<T> h = load(s.hidden + e, n);
      // relu selects, as torch's threshold_backward: a NaN or infinite gradient at h <= 0 gives 0.
      const Vec<T> grad_pre = s.nonlinearity == Nonlinearity::Tanh ? grad_hidden * (1 - h * h)
                                                                   : select(h <= 0, Vec<T>{}, grad_hidden);
      store(s.grad_pre + e, clip(grad_pre, grad_clip), n);
      hidden_sq += grad_hidden * grad_hidden;
    }
    copy_prev_hidden(s.prev_hidden, b);
    if (hidden_norm != nullptr) hidden_norm[b] = horizontal_sum<T>(hidden_sq);
  }
}

template <typename T>
void sum(const SumStep<T>& s, int64_t begin, int64_t end, T* norm) {
  const int64_t W = s.width;
  for (int64_t b = begin; b < end; ++b) {
    Vec<T> sq{};
    for (int64_t j = 0; j < W; j += kLanes<T>) {
      const int64_t n = std::min<int64_t>(kLanes<T>, W - j), e = b * W + j;
      const Vec<T> v = load(s.x + e, n) + load(s.y + e, n);
      store(s.out + e, v, n);
      sq += v * v;
    }
    if (norm != nullptr) norm[b] = horizontal_sum<T>(sq);
  }
}

template <typename T>
void gru_forward(const GruForwardStep<T>& s, int64_t begin, int64_t end) {
  const int64_t H = s.hidden_size;
  for (int64_t b = begin; b < end; ++b) {
    T* a = s.gates + b * 4 * H;
    const T* hg = s.hidden_gates + b * 3 * H;
    for (int64_t j = 0; j < H; j += kLanes<T>) {
      const int64_t n = std::min<int64_t>(kLanes<T>, H - j), e = b * H + j;
      Vec<T> x_r = load(a + j, n), x_z = load(a + H + j, n), x_n = load(a + 2 * H + j, n);
      Vec<T> h_r = load(hg + j, n), h_z = load(hg + H + j, n), h_n = load(hg + 2 * H + j, n);
      if (s.bias_ih != nullptr) {
        x_r += load(s.bias_ih + j, n);
        x_z += load(s.bias_ih + H + j, n);
        x_n += load(s.bias_ih + 2 * H + j, n);
      }
      if (s.bias_hh != nullptr) {
        h_r += load(s.bias_hh + j, n);
        h_z += load(s.bias_hh + H + j, n);
        h_n += load(s.bias_hh + 2 * H + j, n);
      }
      // The same expressions, in the same order, as kernels::gru_cell_forward.
      const Vec<T> r = sigmoid(x_r + h_r), z = sigmoid(x_z + h_z), g = tanh(x_n + r * h_n);
      const Vec<T> hidden = (1 - z) * g + z * load(s.hidden_state + e, n);
      if (s.save_gates) {
        store(a + j, r, n);
        store(a + H + j, z, n);
        store(a + 2 * H + j, g, n);
        store(a + 3 * H + j, h_n, n);
      }
      store(s.output + e, hidden, n);
      store(s.hidden_state + e, hidden, n);
    }
  }
}

template <typename T>
void gru_backward(const GruBackwardStep<T>& s, int64_t begin, int64_t end, T* hidden_norm) {
  const int64_t H = s.hidden_size;
  const T grad_clip = static_cast<T>(s.grad_clip);
  for (int64_t b = begin; b < end; ++b) {
    const T* a = s.gates + b * 4 * H;
    T* dx = s.grad_input_gates + b * 3 * H;
    T* dh = s.grad_hidden_gates + b * 3 * H;
    const T* hidden_prev_row = b < s.prev_hidden.split ? s.prev_hidden.from_prev : s.prev_hidden.initial;
    Vec<T> hidden_sq{};
    for (int64_t j = 0; j < H; j += kLanes<T>) {
      const int64_t n = std::min<int64_t>(kLanes<T>, H - j), e = b * H + j;
      const Vec<T> grad_hidden = load(s.grad_hidden + e, n) + load(s.grad_hidden_extra + e, n);
      const Vec<T> r = load(a + j, n), z = load(a + H + j, n), g = load(a + 2 * H + j, n),
                   h_n = load(a + 3 * H + j, n);
      const Vec<T> hidden_prev = load(hidden_prev_row + e, n);
      // The same expressions, in the same order, as kernels::gru_cell_backward.
      const Vec<T> a_n = clip((grad_hidden - grad_hidden * z) * (1 - g * g), grad_clip);
      const Vec<T> a_z = clip(grad_hidden * (hidden_prev - g) * z * (1 - z), grad_clip);
      const Vec<T> a_r = clip(a_n * h_n * r * (1 - r), grad_clip);
      store(dx + j, a_r, n);
      store(dx + H + j, a_z, n);
      store(dx + 2 * H + j, a_n, n);
      store(dh + j, a_r, n);
      store(dh + H + j, a_z, n);
      store(dh + 2 * H + j, a_n * r, n);
      store(s.grad_hidden + e, grad_hidden * z, n);
      hidden_sq += grad_hidden * grad_hidden;
    }
    copy_prev_hidden(s.prev_hidden, b);
    if (hidden_norm != nullptr) hidden_norm[b] = horizontal_sum<T>(hidden_sq);
  }
}

template <typename T>
const PointwiseKernels<T> kKernels{LSTMFAST_ISA_NAME, &lstm_forward<T>, &lstm_backward<T>,
                                   &rnn_forward<T>, &rnn_backward<T>, &sum<T>,
                                   &gru_forward<T>, &gru_backward<T>};

}  // namespace

const PointwiseKernels<float>& pointwise_float() { return kKernels<float>; }
const PointwiseKernels<double>& pointwise_double() { return kKernels<double>; }

}  // namespace lstmfast::cpu::LSTMFAST_ISA
